-- tierstore catalog, version 2: KV-cache chain links.
-- Applied in one transaction to a version-1 catalog (an old store is upgraded in place when it is
-- first opened read-write); ADD COLUMN rewrites no row: existing blocks get NULL (no link).

-- The key of the block this one extends in a chain (put(key, t, parent=...)); NULL: none. A plain
-- key, not a foreign key: a parent that was deleted or never stored only means "no link".
ALTER TABLE blocks ADD COLUMN parent TEXT;
