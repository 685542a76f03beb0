"""A light client of the local API (used by ``xpuctl``; imports no daemon internals)."""
