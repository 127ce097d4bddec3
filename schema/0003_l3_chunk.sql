-- tierstore catalog, version 3: packed blocks addressable as zarr chunks.
-- Applied in one transaction to a version-2 catalog; ADD COLUMN rewrites no row: existing blocks get
-- NULL until the writer's first open moves L3 to layout 2 (see tierstore/tiers/l3_zarr.py) and fills it.

-- The block's first inner chunk along axis 0 of l3_array: its bytes are rows
-- [l3_chunk * l3_inner / E, ... + nbytes / E) of that (elements, E) uint8 array, E its second dimension.
-- 0 for a large block (an array of its own); NULL: not in L3, or not known.
ALTER TABLE blocks ADD COLUMN l3_chunk INTEGER;
