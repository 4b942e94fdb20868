"""Backends. Each lives in its own module so that importing one never imports another's driver."""
