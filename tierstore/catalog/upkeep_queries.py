"""The catalog's queries for recovery, reports and upkeep (verify, compaction): a mixin of :class:`Catalog`.

Kept apart from :mod:`.sqlite_catalog` (the handle, blocks, statistics, the journal) so that each
file stays readable; the statements are in :mod:`.statements` like every other.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from .block_row import _ARRAY_NAME, BlockRow
from .statements import (
    ALL_ACCESSES,
    ALL_BLOCKS,
    ARRAY_OF,
    BLOCK_AT,
    BLOCK_IN_ARRAY,
    BLOCKS_IN_ARRAY,
    BLOCKS_IN_SHARD,
    CURRENT_SIZES,
    DELETE_BLOCK,
    DELETE_SHARD,
    DROP_UNUSED_SHARDS,
    DROP_VOLATILE,
    GET_BLOCKS_BATCH,
    GET_META,
    HAS_L3_DATA,
    HIT_TOTALS,
    JOURNAL_DELETE,
    L3_LAYOUT,
    L3_ROWS,
    LIVE_ARRAYS,
    MAX_BLOCK_ID,
    OP_TOTALS,
    PUT_TOTAL,
    SET_L3_CHUNK,
    SET_META,
    SHARD_CHUNK_INDEX,
    SHARD_CHUNKS,
    SHARD_EXTENT,
    SHARD_LENGTHS,
    SHARD_USAGE,
    SHORT_SHARDS,
    TIME_RANGE,
    UPSERT_SHARD,
    USED_SHARDS,
    VOLATILE_KEYS,
    WINDOW_COUNTS,
    arrays_named_in,
)

__all__ = ["UpkeepQueries"]


class UpkeepQueries:
    """Named queries of recovery, reports and upkeep (the handle's plumbing is :class:`Catalog`'s)."""

    if TYPE_CHECKING:
        def _write(self, what: str) -> AbstractContextManager[sqlite3.Connection]: ...
        def _query(self, sql: str, params: Sequence[Any] = (), *, what: str = "read the catalog") -> list[Any]: ...
        def _query_one(self, sql: str, params: Sequence[Any] = (), *, what: str = "read the catalog") -> Any: ...

    # -- recovery ---------------------------------------------------------------------------------

    def drop_volatile(self) -> list[str]:
        """Delete the rows of cache-only blocks (a new process starts without them)."""
        with self._write("drop cache-only blocks") as conn:
            keys = [r[0] for r in conn.execute(VOLATILE_KEYS).fetchall()]
            if keys:
                conn.execute(DROP_VOLATILE)
        return keys

    def shard_lengths(self) -> dict[tuple[str, int], int]:
        """Committed length of every shard file."""
        return {(a, s): n for a, s, n in self._query(SHARD_LENGTHS)}

    def short_shards(self, index_bytes: int) -> list[tuple[str, int, int, int | None]]:
        """``(array, shard, extent, length)`` of pack shards whose row is missing (length None) or
        ends before ``extent`` (where its last block ends) plus ``index_bytes``."""
        return [(a, s, e, n) for a, s, e, n in self._query(SHORT_SHARDS, (index_bytes,))
                if isinstance(a, str) and _ARRAY_NAME.fullmatch(a) and type(s) is int and s >= 0
                and type(e) is int and (n is None or type(n) is int)]  # never a path a damaged row made up

    def shard_extent(self, array: str, shard: int) -> int | None:
        """Where the last block in a shard ends (None: no block is in it)."""
        value = self._query_one(SHARD_EXTENT, (array, shard))[0]
        return value if type(value) is int else None

    def set_shard_lengths(self, lengths: dict[tuple[str, int], int]) -> None:
        """Write shard rows (rebuilt from the bytes by recovery or repair)."""
        with self._write("rebuild shard rows") as conn:
            conn.executemany(UPSERT_SHARD, [(a, s, n) for (a, s), n in lengths.items()])

    def shard_chunk_index(self, array: str, shard: int) -> dict[tuple[int, int], int]:
        """``{(offset, size): chunk index}`` of the chunks whose blocks record their ``l3_chunk``."""
        found: dict[tuple[int, int], int] = {}
        for offset, sizes, chunk in self._query(SHARD_CHUNK_INDEX, (array, shard)):
            if type(offset) is int and type(chunk) is int and isinstance(sizes, bytes) and len(sizes) % 4 == 0:
                for i, size in enumerate(memoryview(sizes).cast("I")):
                    found[(offset, int(size))] = chunk + i
                    offset += int(size)
        return found

    def shard_chunks(self, array: str, shard: int) -> list[tuple[int, int]]:
        """``(offset, size)`` of every chunk the blocks in a shard have (rows that do not parse skipped)."""
        chunks: list[tuple[int, int]] = []
        for offset, sizes in self._query(SHARD_CHUNKS, (array, shard)):
            if type(offset) is int and isinstance(sizes, bytes) and len(sizes) % 4 == 0:
                for size in memoryview(sizes).cast("I"):
                    chunks.append((offset, int(size)))
                    offset += int(size)
        return chunks

    def live_arrays(self) -> set[str]:
        """L3 arrays (large blocks) that committed rows point at."""
        return {r[0] for r in self._query(LIVE_ARRAYS)}

    def forget_unused_shards(self) -> None:
        """Drop shard rows no block points at (their files are then orphans), keeping each pack's last."""
        with self._write("forget unused shards") as conn:
            conn.execute(DROP_UNUSED_SHARDS)

    def next_block_id(self) -> int:
        """The first block id never used in this store."""
        recorded = self.meta("next_block_id")
        return max(int(self._query_one(MAX_BLOCK_ID)[0]) + 1, int(recorded) if recorded else 1)

    def data_version(self) -> int:
        """Changes whenever another connection commits (SQLite's ``PRAGMA data_version``)."""
        return int(self._query_one("PRAGMA data_version")[0])

    def meta(self, name: str) -> str | None:
        """A ``store_meta`` value."""
        row = self._query_one(GET_META, (name,))
        return None if row is None else str(row[0])

    def l3_layout(self) -> int | None:
        """The L3 layout the store is in (None: a writer may choose, since nothing is stored yet)."""
        recorded = self.meta(L3_LAYOUT)
        if recorded is not None:
            return int(recorded)
        return 1 if self._query_one(HAS_L3_DATA)[0] else None

    def l3_rows(self) -> list[BlockRow]:
        """Every row whose block has bytes in L3."""
        return [BlockRow.from_tuple(r) for r in self._query(L3_ROWS)]

    def commit_l3_layout(self, chunks: Sequence[tuple[int | None, int]], layout: int) -> None:
        """Record each block's chunk (``(chunk, block_id)`` pairs) and the store's new L3 layout, atomically."""
        with self._write("record the L3 layout") as conn:
            conn.executemany(SET_L3_CHUNK, chunks)
            conn.execute(SET_META, (L3_LAYOUT, str(layout)))

    def set_meta(self, values: dict[str, str]) -> None:
        """Write ``store_meta`` values."""
        with self._write("write store metadata") as conn:
            conn.executemany(SET_META, list(values.items()))

    # -- reports (tierstore.reports) --------------------------------------------------------------

    def access_counts_since(self, since: float) -> list[tuple[str, str | None, int]]:
        """``(op, tier, count)`` of the logged accesses at or after ``since``."""
        return [(op, tier, int(n)) for op, tier, n in self._query(WINDOW_COUNTS, (since,))]

    def hit_totals(self) -> tuple[int, int, int, int]:
        """Gets recorded in ``block_stats``, and those served from L1, L2 and L3."""
        gets, l1, l2, l3 = self._query_one(HIT_TOTALS)
        return int(gets), int(l1), int(l2), int(l3)

    def put_total(self) -> int:
        """Puts recorded in ``block_stats``."""
        return int(self._query_one(PUT_TOTAL)[0])

    def op_totals(self) -> dict[str, int]:
        """Logged accesses per operation (``get``, ``put``, ``delete``)."""
        return {op: int(n) for op, n in self._query(OP_TOTALS)}

    def access_time_range(self) -> tuple[float | None, float | None]:
        """The first and last timestamps of the access log (None, None when it is empty)."""
        first, last = self._query_one(TIME_RANGE)
        return first, last

    def all_accesses(self) -> list[tuple[float, str, str, str | None]]:
        """The whole access log, oldest first: ``(ts, key, op, tier)``."""
        return [tuple(r) for r in self._query(ALL_ACCESSES)]

    def block_sizes(self) -> dict[str, int]:
        """Each stored key's raw byte count."""
        return dict(self._query(CURRENT_SIZES))

    # -- upkeep (tierstore.upkeep) ----------------------------------------------------------------

    def raw_block_rows(self) -> list[tuple[Any, ...]]:
        """Every ``blocks`` row as stored, unparsed (verify reports a damaged one instead of failing), in L3 order."""
        return [tuple(r) for r in self._query(ALL_BLOCKS)]

    def used_shards(self) -> set[tuple[str, int]]:
        """The pack shards some block points at."""
        return {(r[0], r[1]) for r in self._query(USED_SHARDS)}

    def own_arrays_of(self, keys: Sequence[str]) -> list[Any]:
        """The ``blocks/<id>`` arrays of ``keys`` as their rows name them (possibly damaged values)."""
        return [r[0] for key in keys for r in self._query(ARRAY_OF, (key,))]

    def first_row_in_shard(self, array: str, shard: int) -> BlockRow | None:
        """A block stored in shard ``shard`` of L3 array ``array``, if any."""
        row = self._query_one(BLOCK_AT, (array, shard))
        return BlockRow.from_tuple(row) if row is not None else None

    def arrays_in_use(self, arrays: Iterable[str]) -> set[str]:
        """Those of the L3 ``arrays`` some row still names (a commit's large blocks share one array)."""
        wanted = sorted(set(arrays))
        used: set[str] = set()
        for start in range(0, len(wanted), GET_BLOCKS_BATCH):  # one statement per batch, not per array
            batch = wanted[start:start + GET_BLOCKS_BATCH]
            used.update(str(row[0]) for row in self._query(arrays_named_in(len(batch)), batch))
        return used

    def rows_in_array(self, array: str) -> list[BlockRow]:
        """The blocks stored in L3 array ``array``, by their first chunk."""
        return [BlockRow.from_tuple(r) for r in self._query(BLOCKS_IN_ARRAY, (array,))]

    def first_row_in_array(self, array: str) -> BlockRow | None:
        """A block stored in L3 array ``array``, if any."""
        row = self._query_one(BLOCK_IN_ARRAY, (array,))
        return BlockRow.from_tuple(row) if row is not None else None

    def shard_usage_rows(self) -> list[tuple[str, int, int, int, int]]:
        """Per shard: ``(array, shard, committed length, blocks in it, their stored bytes)``."""
        return [(a, int(s), int(n), int(c), int(live)) for a, s, n, c, live in self._query(SHARD_USAGE)]

    def rows_in_shard(self, array: str, shard: int) -> list[BlockRow]:
        """The blocks of one pack shard, in file order."""
        return [BlockRow.from_tuple(r) for r in self._query(BLOCKS_IN_SHARD, (array, shard))]

    def drop_blocks(self, keys: Sequence[str], what: str = "drop damaged blocks") -> None:
        """Delete the rows of ``keys`` as they are (plain deletes: a damaged row need not parse)."""
        with self._write(what) as conn:
            conn.executemany(DELETE_BLOCK, [(k,) for k in keys])

    def drop_journal_rows(self, ids: Sequence[int]) -> None:
        """Delete journal rows (verify --fix: moves a crash left, settled by hand)."""
        with self._write("drop leftover journal rows") as conn:
            conn.executemany(JOURNAL_DELETE, [(i,) for i in ids])

    def drop_shard_rows(self, shards: Sequence[tuple[str, int]]) -> None:
        """Forget the committed lengths of shard files that are gone."""
        with self._write("drop rows of missing shard files") as conn:
            conn.executemany(DELETE_SHARD, shards)

    @contextmanager
    def hold_write_lock(self, what: str) -> Iterator[None]:
        """Hold the catalog's write transaction (empty) for the duration of the block."""
        with self._write(what):
            yield
