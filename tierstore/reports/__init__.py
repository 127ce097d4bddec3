"""Reports: what a store did, read back from its catalog, and what the process cost (peak memory)."""
