-- The change feed's own scripts (changes.py); the feed's layout is in _feed.lua, appended.
-- KEYS: 1 "fm:{ns}:" (the namespace prefix), 2 its feed hash, 3 its log (see _feed.lua).
-- <bind>
local P = KEYS[1]
local FEED, LOG = P .. 'f', P .. 's'
-- </bind>

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
