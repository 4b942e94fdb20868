-- ARGV: 1 token, 2 change of the record count, 3 change of the bytes, then pairs of key and
-- its records ("" = none left). Writes them if token holds the lock. Returns 1, or 0 (nothing
-- written) when it does not. A create's writes: refused up front on a full server.
if not holds(ARGV[1]) then return 0 end
put_records(ARGV)
return 1
