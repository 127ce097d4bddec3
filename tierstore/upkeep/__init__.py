"""Upkeep: recovery at open, verification, compaction and garbage collection, warm restart."""
