-- tierstore catalog, version 1.
-- Applied in one transaction; PRAGMA user_version is set to 1 by the loader.

-- Facts about the store itself: store_id, created, layout.
CREATE TABLE store_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- One row per stored tensor ("block"). key lives only here; files are named by block_id.
CREATE TABLE blocks (
    key          TEXT PRIMARY KEY,
    block_id     INTEGER NOT NULL UNIQUE,
    dtype        TEXT NOT NULL,              -- torch dtype name, e.g. 'bfloat16'
    shape        TEXT NOT NULL,              -- JSON list of ints
    nbytes       INTEGER NOT NULL,           -- raw size
    checksum     INTEGER NOT NULL,           -- crc32c of the raw little-endian bytes
    durable      INTEGER NOT NULL DEFAULT 1, -- 0: cache-only block, dropped on the next open
    codec        TEXT NOT NULL,              -- L3 codec id: raw, zstd1, shuffle2-zstd1, blosclz4-2
    l3_array     TEXT,                       -- 'packs/<codec>' or 'blocks/<id>'; NULL: not in L3
    l3_shard     INTEGER,
    l3_offset    INTEGER,
    l3_sizes     BLOB,                       -- little-endian uint32 encoded size per inner chunk
    l3_inner     INTEGER,                    -- decoded size of one inner chunk
    stored_bytes INTEGER NOT NULL DEFAULT 0, -- bytes on disk in L3
    tiers        INTEGER NOT NULL DEFAULT 4, -- residency as last recorded: 1 = L1, 2 = L2, 4 = L3
    created      REAL NOT NULL,              -- unix time of the first put of this key
    updated      REAL NOT NULL               -- unix time of the last put of this key
) WITHOUT ROWID;
CREATE INDEX blocks_by_type ON blocks (dtype, shape, updated);
CREATE INDEX blocks_by_location ON blocks (l3_array, l3_shard);
CREATE INDEX blocks_volatile ON blocks (key) WHERE durable = 0;

-- Committed length of every L3 shard file; anything past it is a torn append.
CREATE TABLE shards (
    array  TEXT NOT NULL,
    shard  INTEGER NOT NULL,
    length INTEGER NOT NULL,
    PRIMARY KEY (array, shard)
) WITHOUT ROWID;

-- Per-key access statistics, updated in batches from memory (group commit).
CREATE TABLE block_stats (
    key               TEXT PRIMARY KEY,
    access_count      INTEGER NOT NULL DEFAULT 0,
    get_count         INTEGER NOT NULL DEFAULT 0,
    put_count         INTEGER NOT NULL DEFAULT 0,
    hits_l1           INTEGER NOT NULL DEFAULT 0,
    hits_l2           INTEGER NOT NULL DEFAULT 0,
    hits_l3           INTEGER NOT NULL DEFAULT 0,
    first_access      REAL,
    last_access       REAL,
    interarrival_ewma REAL                   -- seconds between accesses, exponentially weighted
) WITHOUT ROWID;

-- Recent accesses, oldest dropped past CacheConfig.history_max_rows.
CREATE TABLE access_log (
    id   INTEGER PRIMARY KEY,
    ts   REAL NOT NULL,
    key  TEXT NOT NULL,
    op   TEXT NOT NULL,                      -- get, put, delete
    tier TEXT                                -- where a get was served: L1, L2, L3
);
CREATE INDEX access_log_by_key ON access_log (key, ts);

-- Which key followed which (gets only): the predictor's successor table.
CREATE TABLE successors (
    key      TEXT NOT NULL,
    next_key TEXT NOT NULL,
    count    INTEGER NOT NULL,
    PRIMARY KEY (key, next_key)
) WITHOUT ROWID;

-- Moves between tiers in flight; empty whenever no move is running.
CREATE TABLE journal (
    id       INTEGER PRIMARY KEY,
    block_id INTEGER NOT NULL,
    key      TEXT NOT NULL,
    op       TEXT NOT NULL,                  -- promote, demote, spill
    src      TEXT NOT NULL,
    dst      TEXT NOT NULL,
    state    TEXT NOT NULL,                  -- intent, copied, verified
    created  REAL NOT NULL
);
