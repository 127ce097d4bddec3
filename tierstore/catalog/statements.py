"""Every SQL statement of the catalog, as named constants (the schema itself is in ``schema/``)."""

from __future__ import annotations

# -- blocks, shards, meta, statistics, journal (tierstore.catalog.sqlite_catalog) ---------------
BLOCK_COLUMNS = ("key, block_id, dtype, shape, nbytes, checksum, durable, codec, l3_array, l3_shard, "
                 "l3_offset, l3_sizes, l3_inner, stored_bytes, tiers, created, updated, parent, l3_chunk")
GET_BLOCK = f"SELECT {BLOCK_COLUMNS} FROM blocks WHERE key = ?"
GET_BLOCKS_BATCH = 256
"""Keys per ``get_blocks_in`` statement (well under SQLite's limit on bound parameters)."""


def get_blocks_in(count: int) -> str:
    """``SELECT`` the rows of ``count`` keys given as parameters, in one statement."""
    return f"SELECT {BLOCK_COLUMNS} FROM blocks WHERE key IN ({', '.join('?' * count)})"


def arrays_named_in(count: int) -> str:
    """``SELECT`` which of ``count`` L3 arrays given as parameters some row names (schema 4's index answers)."""
    return f"SELECT DISTINCT l3_array FROM blocks WHERE l3_array IN ({', '.join('?' * count)})"


HAS_BLOCK = "SELECT 1 FROM blocks WHERE key = ?"
GET_BLOCK_BY_ID = f"SELECT {BLOCK_COLUMNS} FROM blocks WHERE block_id = ?"
UPSERT_BLOCK = f"""
INSERT INTO blocks ({BLOCK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(key) DO UPDATE SET
  block_id = excluded.block_id, dtype = excluded.dtype, shape = excluded.shape, nbytes = excluded.nbytes,
  checksum = excluded.checksum, durable = excluded.durable, codec = excluded.codec,
  l3_array = excluded.l3_array, l3_shard = excluded.l3_shard, l3_offset = excluded.l3_offset,
  l3_sizes = excluded.l3_sizes, l3_inner = excluded.l3_inner, stored_bytes = excluded.stored_bytes,
  tiers = excluded.tiers, updated = excluded.updated, parent = excluded.parent, l3_chunk = excluded.l3_chunk
"""
INSERT_NEW_BLOCK = f"""
INSERT INTO blocks ({BLOCK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(key) DO NOTHING
"""
DELETE_BLOCK = "DELETE FROM blocks WHERE key = ?"
COUNT_BLOCKS = "SELECT count(*), coalesce(sum(nbytes), 0), coalesce(sum(stored_bytes), 0) FROM blocks"
KEYS_PAGE = "SELECT key FROM blocks WHERE key > ? ORDER BY key LIMIT ?"
KEYS_FROM_PAGE = "SELECT key FROM blocks WHERE key >= ? ORDER BY key LIMIT ?"
KEYS_PREFIX_PAGE = "SELECT key FROM blocks WHERE key > ? AND key >= ? AND key < ? ORDER BY key LIMIT ?"
FIND_BY_TYPE = "SELECT key FROM blocks WHERE dtype = ? AND shape = ? ORDER BY updated DESC LIMIT ?"
MAX_BLOCK_ID = "SELECT coalesce(max(block_id), 0) FROM blocks"
VOLATILE_KEYS = "SELECT key FROM blocks INDEXED BY blocks_volatile WHERE durable = 0"
DROP_VOLATILE = f"DELETE FROM blocks WHERE key IN ({VOLATILE_KEYS})"
LIVE_ARRAYS = "SELECT l3_array FROM blocks WHERE l3_array >= 'blocks/' AND l3_array < 'blocks0'"
SHARD_LENGTHS = "SELECT array, shard, length FROM shards"
UPSERT_SHARD = """
INSERT INTO shards (array, shard, length) VALUES (?, ?, ?)
ON CONFLICT(array, shard) DO UPDATE SET length = excluded.length
"""
DROP_UNUSED_SHARDS = """
DELETE FROM shards WHERE NOT EXISTS (
  SELECT 1 FROM blocks WHERE blocks.l3_array = shards.array AND blocks.l3_shard = shards.shard)
  AND (array, shard) NOT IN (SELECT array, max(shard) FROM shards GROUP BY array)
"""
SHORT_SHARDS = """
SELECT b.l3_array, b.l3_shard, max(b.l3_offset + b.stored_bytes), s.length
FROM blocks b LEFT JOIN shards s ON s.array = b.l3_array AND s.shard = b.l3_shard
WHERE b.l3_array >= 'packs/' AND b.l3_array < 'packs0' AND b.l3_offset >= 0 AND b.stored_bytes >= 0
GROUP BY b.l3_array, b.l3_shard
HAVING s.length IS NULL OR s.length < max(b.l3_offset + b.stored_bytes) + ?
"""
"""Pack shards whose row is missing or shorter than the blocks in them (and the index after) need."""
SHARD_EXTENT = """
SELECT max(l3_offset + stored_bytes) FROM blocks INDEXED BY blocks_by_location
WHERE l3_array = ? AND l3_shard = ? AND l3_offset >= 0 AND stored_bytes >= 0
"""
SHARD_CHUNKS = "SELECT l3_offset, l3_sizes FROM blocks WHERE l3_array = ? AND l3_shard = ?"
GET_META = "SELECT value FROM store_meta WHERE name = ?"
SHARD_CHUNK_INDEX = ("SELECT l3_offset, l3_sizes, l3_chunk FROM blocks WHERE l3_array = ? AND l3_shard = ? "
                     "AND l3_chunk IS NOT NULL")
L3_LAYOUT = "l3_layout"
"""``store_meta`` row: the L3 layout of the store (see :mod:`tierstore.tiers.l3_zarr`); absent: layout 1."""
L3_ROWS = f"SELECT {BLOCK_COLUMNS} FROM blocks WHERE l3_array IS NOT NULL"
SET_L3_CHUNK = "UPDATE blocks SET l3_chunk = ? WHERE block_id = ?"
HAS_L3_DATA = "SELECT EXISTS (SELECT 1 FROM blocks) OR EXISTS (SELECT 1 FROM shards)"
DELETE_META = "DELETE FROM store_meta WHERE name = ?"
SET_META = "INSERT INTO store_meta (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value"
GET_STATS = ("SELECT access_count, get_count, put_count, hits_l1, hits_l2, hits_l3, first_access, last_access, "
             "interarrival_ewma FROM block_stats WHERE key = ?")
UPSERT_STATS = """
INSERT INTO block_stats (key, access_count, get_count, put_count, hits_l1, hits_l2, hits_l3,
                         first_access, last_access, interarrival_ewma)
VALUES (:key, :n, :gets, :puts, :l1, :l2, :l3, :first, :last, :gap)
ON CONFLICT(key) DO UPDATE SET
  interarrival_ewma = CASE
    WHEN block_stats.last_access IS NULL THEN excluded.interarrival_ewma
    WHEN block_stats.interarrival_ewma IS NULL
      THEN (excluded.last_access - block_stats.last_access) / excluded.access_count
    ELSE 0.7 * block_stats.interarrival_ewma
         + 0.3 * (excluded.last_access - block_stats.last_access) / excluded.access_count END,
  access_count = block_stats.access_count + excluded.access_count,
  get_count = block_stats.get_count + excluded.get_count,
  put_count = block_stats.put_count + excluded.put_count,
  hits_l1 = block_stats.hits_l1 + excluded.hits_l1,
  hits_l2 = block_stats.hits_l2 + excluded.hits_l2,
  hits_l3 = block_stats.hits_l3 + excluded.hits_l3,
  last_access = excluded.last_access
"""
INSERT_ACCESS = "INSERT INTO access_log (ts, key, op, tier) VALUES (?, ?, ?, ?)"
TRIM_ACCESS = "DELETE FROM access_log WHERE id <= (SELECT max(id) FROM access_log) - ?"
UPSERT_SUCCESSOR = """
INSERT INTO successors (key, next_key, count) VALUES (?, ?, ?)
ON CONFLICT(key, next_key) DO UPDATE SET count = successors.count + excluded.count
"""
RECENT_ACCESS = "SELECT ts, key, op, tier FROM access_log ORDER BY id DESC LIMIT ?"
RECENT_ACCESS_KEY = "SELECT ts, key, op, tier FROM access_log WHERE key = ? ORDER BY id DESC LIMIT ?"
JOURNAL_COUNT = "SELECT count(*) FROM journal"
JOURNAL_INSERT = "INSERT INTO journal (block_id, key, op, src, dst, state, created) VALUES (?, ?, ?, ?, ?, ?, ?)"
JOURNAL_ROWS = "SELECT id, block_id, key, op, src, dst, state, created FROM journal ORDER BY id"
JOURNAL_DELETE = "DELETE FROM journal WHERE id = ?"
TRIM_SUCCESSORS = """
DELETE FROM successors WHERE (key, next_key) IN (
  SELECT key, next_key FROM successors ORDER BY count ASC LIMIT max(0, (SELECT count(*) FROM successors) - ?))
"""
SUCCESSOR_ROWS = "SELECT key, next_key, count FROM successors ORDER BY count DESC LIMIT ?"
HOT_BLOCKS = """
SELECT s.key, s.access_count, s.last_access, b.nbytes FROM block_stats s JOIN blocks b ON b.key = s.key
WHERE s.access_count >= ? ORDER BY s.access_count DESC, s.last_access DESC LIMIT ?
"""
USER_VERSION = "PRAGMA user_version"

# -- reports (tierstore.reports.activity) --------------------------------------------------------
WINDOW_COUNTS = "SELECT op, tier, count(*) FROM access_log WHERE ts >= ? GROUP BY op, tier"
HIT_TOTALS = ("SELECT coalesce(sum(get_count), 0), coalesce(sum(hits_l1), 0), coalesce(sum(hits_l2), 0), "
              "coalesce(sum(hits_l3), 0) FROM block_stats")
TIME_RANGE = "SELECT min(ts), max(ts) FROM access_log"
PUT_TOTAL = "SELECT coalesce(sum(put_count), 0) FROM block_stats"
OP_TOTALS = "SELECT op, count(*) FROM access_log GROUP BY op"
ALL_ACCESSES = "SELECT ts, key, op, tier FROM access_log ORDER BY id"
CURRENT_SIZES = "SELECT key, nbytes FROM blocks"

# -- upkeep (tierstore.upkeep.verify, tierstore.upkeep.compaction) ------------------------------
ALL_BLOCKS = f"SELECT {BLOCK_COLUMNS} FROM blocks ORDER BY l3_array, l3_shard, l3_offset"
USED_SHARDS = "SELECT DISTINCT l3_array, l3_shard FROM blocks WHERE l3_array >= 'packs/' AND l3_array < 'packs0'"
DELETE_SHARD = "DELETE FROM shards WHERE array = ? AND shard = ?"
ARRAY_OF = "SELECT l3_array FROM blocks WHERE key = ? AND l3_array >= 'blocks/' AND l3_array < 'blocks0'"
BLOCKS_IN_ARRAY = f"SELECT {BLOCK_COLUMNS} FROM blocks WHERE l3_array = ? ORDER BY l3_chunk"
BLOCK_AT = f"SELECT {BLOCK_COLUMNS} FROM blocks WHERE l3_array = ? AND l3_shard = ? LIMIT 1"
BLOCK_IN_ARRAY = f"SELECT {BLOCK_COLUMNS} FROM blocks WHERE l3_array = ? LIMIT 1"
SHARD_USAGE = """
SELECT s.array, s.shard, s.length, count(b.key), coalesce(sum(b.stored_bytes), 0)
FROM shards s LEFT JOIN blocks b ON b.l3_array = s.array AND b.l3_shard = s.shard
GROUP BY s.array, s.shard ORDER BY s.array, s.shard
"""
BLOCKS_IN_SHARD = f"SELECT {BLOCK_COLUMNS} FROM blocks WHERE l3_array = ? AND l3_shard = ? ORDER BY l3_offset"
