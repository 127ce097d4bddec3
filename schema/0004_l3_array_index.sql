-- tierstore catalog, version 4: the large blocks of one commit share one L3 array (layout 3).
-- A replaced or deleted large block's array is removed only when no row names it any more; this index
-- answers that question without a scan. Older tierstore refuses a version-4 catalog, so no code that
-- would remove a shared array with its first freed block ever writes to such a store.
CREATE INDEX IF NOT EXISTS blocks_by_l3_array ON blocks (l3_array);
