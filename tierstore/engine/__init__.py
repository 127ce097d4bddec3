"""The engine: the handle, its transactions, residency in the volatile tiers, the migrator."""
