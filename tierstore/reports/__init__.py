"""Reports: what a store did, read back from its catalog."""
