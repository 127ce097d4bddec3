"""The SQLite catalog: which blocks exist, where their bytes are, how they are used.

The catalog is a plain SQLite file (``catalog.sqlite``, WAL mode) whose
tables are documented in ``schema/`` and the README; ``sqlite-utils`` and
datasette read it as it is. Its schema is the numbered ``schema/NNNN_*.sql``
files, applied in order under ``PRAGMA user_version``.

All SQL lives here as named constants. Every sqlite3 error is translated at
one choke point (:meth:`Catalog._fail`). One connection serves all threads of
a handle, behind a lock: statements are microseconds and sqlite3 serialises
a connection anyway. Writes use ``BEGIN IMMEDIATE`` so that a busy database
waits for the writer instead of failing half-way.
"""

from __future__ import annotations

import errno
import importlib.resources
import json
import os
import re
import resource
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import crc32c
import sqlite_utils

from ..errors import (
    CatalogError,
    CorruptBlockError,
    SchemaVersionError,
    StoreFullError,
    TierStoreError,
    translate_os_error,
)
from .block_row import BlockRow
from .statements import (
    COUNT_BLOCKS,
    DELETE_BLOCK,
    DELETE_META,
    FIND_BY_TYPE,
    GET_BLOCK,
    GET_BLOCK_BY_ID,
    GET_BLOCKS_BATCH,
    GET_META,
    GET_STATS,
    HAS_BLOCK,
    HOT_BLOCKS,
    INSERT_ACCESS,
    INSERT_NEW_BLOCK,
    JOURNAL_COUNT,
    JOURNAL_DELETE,
    JOURNAL_INSERT,
    JOURNAL_ROWS,
    KEYS_FROM_PAGE,
    KEYS_PAGE,
    KEYS_PREFIX_PAGE,
    RECENT_ACCESS,
    RECENT_ACCESS_KEY,
    SET_META,
    SUCCESSOR_ROWS,
    TRIM_ACCESS,
    TRIM_SUCCESSORS,
    UPSERT_BLOCK,
    UPSERT_SHARD,
    UPSERT_STATS,
    UPSERT_SUCCESSOR,
    USER_VERSION,
    get_blocks_in,
)
from .upkeep_queries import UpkeepQueries

__all__ = ["Catalog", "BlockRow", "SCHEMA_VERSION", "schema_scripts", "schema_version_of"]



COUNTER_SUFFIX = "-commits"
"""The commit counter kept outside the WAL (see ``Catalog._check_commit_counter``)."""
COMMIT_SEQ = "commit_seq"
ROLLBACK_META = "catalog_rollback"
CREATING_SUFFIX = ".tmp"
"""A catalog being created (renamed into place when complete; a leftover is replaced)."""
HEADROOM_SUFFIX = "-headroom"
HEADROOM = 1 << 20
"""Disk held beside the catalog and given back when the disk is full, so that deletes can still commit."""

_SCRIPT_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def schema_scripts() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of every schema migration, in order."""
    try:
        root: Any = importlib.resources.files("tierstore._schema")
        entries = [(p.name, p.read_text(encoding="utf-8")) for p in root.iterdir() if p.name.endswith(".sql")]
    except (ModuleNotFoundError, FileNotFoundError):
        folder = Path(__file__).resolve().parents[2] / "schema"
        entries = [(p.name, p.read_text(encoding="utf-8")) for p in folder.glob("*.sql")]
    scripts = []
    for name, sql in entries:
        match = _SCRIPT_NAME.match(name)
        if match:
            scripts.append((int(match.group(1)), name, sql))
    scripts.sort()
    if not scripts or [v for v, _, _ in scripts] != list(range(1, len(scripts) + 1)):
        raise CatalogError(f"schema migrations are missing or misnumbered: {[n for _, n, _ in scripts]}")
    return scripts


SCHEMA_VERSION = len(schema_scripts())
READABLE_FROM = 3
"""The oldest schema a read-only handle reads as it is: version 4 only added an index that writers use."""


class Catalog(UpkeepQueries):
    """The catalog of one store: a single SQLite connection shared by the handle's threads."""

    def __init__(self, path: str | Path, *, readonly: bool = False, durable: bool = True) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        if readonly and not self.path.exists():
            raise CatalogError(f"no catalog at {self.path}; is this a tierstore store?", path=str(self.path))
        if not readonly and _unborn(self.path):
            self._create(durable)
        try:
            conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            self._conn = conn
            conn.execute("PRAGMA busy_timeout = 30000")
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'OFF'}")
            version = conn.execute(USER_VERSION).fetchone()[0]
        except sqlite3.Error as exc:
            raise self._fail(exc, "open the catalog") from None
        if version > SCHEMA_VERSION:
            conn.close()
            raise SchemaVersionError(
                f"catalog {self.path} has schema version {version}, newer than this tierstore knows "
                f"({SCHEMA_VERSION}); upgrade tierstore to open it", path=str(self.path))
        if version == 0 and readonly:
            conn.close()
            raise SchemaVersionError(
                f"catalog {self.path} is empty: the store's first open did not finish; open it read-write "
                "once to create it", path=str(self.path))
        if version < SCHEMA_VERSION:
            if readonly and version < READABLE_FROM:
                conn.close()
                raise SchemaVersionError(
                    f"catalog {self.path} has schema version {version}; open it read-write once to upgrade "
                    f"it to {SCHEMA_VERSION}", path=str(self.path))
            if not readonly:
                self._migrate(version)
        if readonly:
            conn.execute("PRAGMA query_only = 1")
        self._counter_fd = -1
        self.rollback_note = self._check_commit_counter()
        """Non-empty when the catalog lost commits it had acknowledged, until ``verify --fix``."""
        self._headroom_gone = False
        if not readonly:
            self._reserve_headroom()
        self.db = sqlite_utils.Database(conn)

    # -- plumbing ---------------------------------------------------------------------------------

    def _fail(self, exc: sqlite3.Error, what: str) -> TierStoreError:
        """The one place sqlite3 errors become tierstore errors."""
        text = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and ("disk is full" in text or "too big" in text
                                                          or self._write_refused_for_size(exc)):
            return StoreFullError(f"{what}: the disk under {self.path} is full ({text}); "
                                  "free space and retry (nothing committed was lost)", path=str(self.path))
        if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text):
            return CatalogError(f"{what}: catalog {self.path} is damaged ({text}); restore it from a backup "
                                "or run 'tierstore verify --fix' on a copy", path=str(self.path))
        return CatalogError(f"{what}: {text} (catalog {self.path})", path=str(self.path))

    def _write_refused_for_size(self, exc: sqlite3.Error) -> bool:
        """A failed write that is a size limit, not a broken disk (SQLite reports EFBIG as an I/O error)."""
        if getattr(exc, "sqlite_errorname", "") != "SQLITE_IOERR_WRITE":
            return False
        try:
            if os.statvfs(self.path.parent).f_bavail * os.statvfs(self.path.parent).f_frsize < HEADROOM:
                return True
            soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if soft == resource.RLIM_INFINITY:
                return False
            files = (self.path, self.path.with_name(self.path.name + "-wal"))
            return any(f.exists() and f.stat().st_size + (1 << 16) >= soft for f in files)
        except OSError:
            return False

    # -- commit counter -----------------------------------------------------------------------------
    # SQLite drops every WAL frame after the first damaged one without a word, so a damaged WAL after a
    # killed writer silently rolls back acknowledged commits. Each write transaction therefore bumps
    # commit_seq in store_meta and, after COMMIT, writes it to a small file beside the catalog (outside
    # the WAL). A catalog whose commit_seq is behind that file lost commits. The file is written
    # without fsync: it survives a killed process (the page cache does), and a file behind the
    # catalog (after a power cut) is never mistaken for a loss.

    def _check_commit_counter(self) -> str:
        counted = _read_counter(self.path.with_name(self.path.name + COUNTER_SUFFIX))  # before the catalog
        seq = _as_count(self._query_one(GET_META, (COMMIT_SEQ,)))
        note = self.meta(ROLLBACK_META) or ""
        if seq < counted:
            note = (f"the catalog lost commits {seq + 1} to {counted} it had acknowledged (its write-ahead log "
                    "was damaged after a crash, or it was restored from an older copy): blocks written or "
                    "deleted by them are missing or older; check them, then run 'tierstore verify --fix' "
                    "to acknowledge")
        if self.readonly:
            return note
        try:
            self._counter_fd = os.open(self.path.with_name(self.path.name + COUNTER_SUFFIX),
                                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise translate_os_error(exc, what="open the commit counter", path=self.path) from None
        if seq < counted:
            self.set_meta({ROLLBACK_META: note})  # kept until acknowledged: the counter follows the catalog now
        return note

    def acknowledge_rollback(self) -> None:
        """Forget a detected loss of commits (``verify --fix``, once it has been reported)."""
        with self._write("acknowledge lost commits") as conn:
            conn.execute(DELETE_META, (ROLLBACK_META,))
        self.rollback_note = ""

    def _create(self, durable: bool) -> None:
        """Build a complete catalog in a temporary file and rename it into place.

        A kill half-way through a first open then leaves no catalog (or the old empty one) and a
        temporary file the next writer replaces, never a catalog stuck at an early schema version.
        """
        tmp = self.path.with_name(self.path.name + CREATING_SUFFIX)
        tmp.unlink(missing_ok=True)
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode = MEMORY")  # the rename is what makes creation atomic
                for version, _name, sql in schema_scripts():
                    conn.executescript(f"BEGIN;\n{sql}\nPRAGMA user_version = {version};\nCOMMIT;")
            finally:
                conn.close()
            if durable:
                fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, self.path)
            if durable:
                fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except sqlite3.Error as exc:
            tmp.unlink(missing_ok=True)
            raise self._fail(exc, "create the catalog") from None
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise translate_os_error(exc, what="create the catalog", path=self.path) from None

    def _migrate(self, current: int) -> None:
        for version, name, sql in schema_scripts():
            if version <= current:
                continue
            try:
                self._conn.executescript(f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {version};\nCOMMIT;")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise self._fail(exc, f"apply schema {name}") from None

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``); rolled back on any error."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                seq = 0
                if self._counter_fd >= 0:  # read under the write lock: the file is never ahead of the catalog
                    seq = _as_count(conn.execute(GET_META, (COMMIT_SEQ,)).fetchone()) + 1
                    conn.execute(SET_META, (COMMIT_SEQ, str(seq)))
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise self._fail(exc, what) from None
            try:
                yield conn
                conn.execute("COMMIT")
                if self._counter_fd >= 0:
                    _write_counter(self._counter_fd, seq)
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise self._fail(exc, what) from None
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: Sequence[Any] = (), *, what: str = "read the catalog") -> list[Any]:
        """Run a read statement and return all rows."""
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._fail(exc, what) from None

    def _query_one(self, sql: str, params: Sequence[Any] = (), *, what: str = "read the catalog") -> Any:
        """Run a read statement and return its first row (or None)."""
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchone()
            except sqlite3.Error as exc:
                raise self._fail(exc, what) from None

    # -- blocks -----------------------------------------------------------------------------------

    def get_block(self, key: str) -> BlockRow | None:
        """The committed row of ``key``."""
        row = self._query_one(GET_BLOCK, (key,))
        return None if row is None else BlockRow.from_tuple(row)

    def block_by_id(self, block_id: int) -> BlockRow | None:
        """The committed row holding ``block_id``, if any."""
        row = self._query_one(GET_BLOCK_BY_ID, (block_id,))
        return None if row is None else BlockRow.from_tuple(row)

    def has_block(self, key: str) -> bool:
        """Whether ``key`` has a committed row."""
        return self._query_one(HAS_BLOCK, (key,)) is not None

    def commit_blocks(self, rows: Sequence[BlockRow], deletes: Sequence[str],
                      shard_lengths: dict[tuple[str, int], int], next_block_id: int) -> list[BlockRow]:
        """Switch in new rows and drop deleted keys in one transaction; return the replaced rows.

        ``next_block_id`` is recorded too, so block ids (and so file names) are never reused, even
        after the highest block is deleted: a reader's cached file can never alias a newer block.
        """
        if self._headroom_gone:
            self._reserve_headroom()
        try:
            return self._commit_blocks(rows, deletes, shard_lengths, next_block_id)
        except StoreFullError:
            # On a full disk SQLite cannot grow its WAL, so even a delete (the way to free space) would
            # fail: a commit that only deletes gets the space held in reserve for this, and one retry.
            if rows or not self._release_headroom():
                raise
            return self._commit_blocks(rows, deletes, shard_lengths, next_block_id)

    def _reserve_headroom(self) -> None:
        """Hold ``HEADROOM`` bytes of disk beside the catalog (best effort: a full disk leaves none)."""
        path = self.path.with_name(self.path.name + HEADROOM_SUFFIX)
        self._headroom_gone = True
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, HEADROOM)
            self._headroom_gone = False
        except OSError as exc:
            os.ftruncate(fd, 0)
            self._headroom_gone = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # else: unsupported here
        finally:
            os.close(fd)

    def _release_headroom(self) -> bool:
        path = self.path.with_name(self.path.name + HEADROOM_SUFFIX)
        try:
            held = path.lstat().st_size > 0 and not path.is_symlink()
            path.unlink()  # a link itself goes, never what it points at
        except OSError:
            return False
        self._headroom_gone = True
        return held

    def _commit_blocks(self, rows: Sequence[BlockRow], deletes: Sequence[str],
                       shard_lengths: dict[tuple[str, int], int], next_block_id: int) -> list[BlockRow]:
        replaced: list[BlockRow] = []
        with self._write("commit blocks") as conn:
            conn.execute(SET_META, ("next_block_id", str(next_block_id)))
            keys = [r.key for r in rows] + list(deletes)  # distinct: one change per key
            for start in range(0, len(keys), GET_BLOCKS_BATCH):  # one statement per batch, not per key
                batch = keys[start:start + GET_BLOCKS_BATCH]
                replaced.extend(_replaced_row(old) for old in conn.execute(get_blocks_in(len(batch)), batch))
            conn.executemany(UPSERT_SHARD, [(a, s, n) for (a, s), n in shard_lengths.items()])
            conn.executemany(UPSERT_BLOCK, [r.to_tuple() for r in rows])
            conn.executemany(DELETE_BLOCK, [(k,) for k in deletes])
        return replaced

    def totals(self) -> tuple[int, int, int]:
        """``(blocks, raw bytes, stored bytes)`` of the committed state."""
        count, nbytes, stored = self._query_one(COUNT_BLOCKS)
        return int(count), int(nbytes), int(stored)

    def keys_page(self, after: str, limit: int, prefix: str | None) -> list[str]:
        """Up to ``limit`` keys greater than ``after`` (and starting with ``prefix``), in order."""
        if prefix is None:
            return [r[0] for r in self._query(KEYS_PAGE, (after, limit))]
        high = _prefix_upper_bound(prefix)
        if high is None:  # the prefix ends in U+10FFFF: no string bounds it from above
            rows = self._query(KEYS_PAGE, (after, limit)) if after >= prefix else self._query(
                KEYS_FROM_PAGE, (prefix, limit))
            return [r[0] for r in rows if r[0].startswith(prefix)]
        return [r[0] for r in self._query(KEYS_PREFIX_PAGE, (after, prefix, high, limit))]

    def find_by_type(self, dtype: str, shape: tuple[int, ...], limit: int = 1) -> list[str]:
        """Keys of the newest blocks with this dtype and shape."""
        return [r[0] for r in self._query(FIND_BY_TYPE, (dtype, json.dumps(list(shape)), limit))]

    # -- statistics -------------------------------------------------------------------------------

    def write_history(self, log: Sequence[tuple[float, str, str, str | None]],
                      stats: Sequence[dict[str, Any]], successors: Sequence[tuple[str, str, int]],
                      max_rows: int) -> None:
        """Append a batch of accesses and fold it into the per-key statistics (one transaction)."""
        with self._write("record access history") as conn:
            conn.executemany(INSERT_ACCESS, log)
            conn.executemany(UPSERT_STATS, stats)
            conn.executemany(UPSERT_SUCCESSOR, successors)
            conn.execute(TRIM_ACCESS, (max_rows,))

    def block_stats(self, key: str) -> dict[str, Any] | None:
        """The statistics row of ``key``."""
        row = self._query_one(GET_STATS, (key,))
        if row is None:
            return None
        names = ("access_count", "get_count", "put_count", "hits_l1", "hits_l2", "hits_l3", "first_access",
                 "last_access", "interarrival_ewma")
        return dict(zip(names, row, strict=True))

    def history(self, key: str | None, limit: int) -> list[tuple[float, str, str, str | None]]:
        """The newest ``limit`` accesses (of ``key``), newest first."""
        if key is None:
            return [tuple(r) for r in self._query(RECENT_ACCESS, (limit,))]
        return [tuple(r) for r in self._query(RECENT_ACCESS_KEY, (key, limit))]

    def journal_size(self) -> int:
        """Moves recorded as in flight."""
        return int(self._query_one(JOURNAL_COUNT)[0])

    def journal_begin(self, moves: Sequence[tuple[int, str, str, str, str]]) -> list[int]:
        """Record ``(block_id, key, op, src, dst)`` moves as intents (one transaction); their row ids."""
        stamp = time.time()
        ids: list[int] = []
        with self._write("journal tier moves") as conn:
            for block_id, key, op, src, dst in moves:
                cursor = conn.execute(JOURNAL_INSERT, (block_id, key, op, src, dst, "intent", stamp))
                ids.append(int(cursor.lastrowid or 0))
        return ids

    def journal_end(self, ids: Sequence[int]) -> None:
        """Remove finished (or undone) moves from the journal."""
        if ids:
            with self._write("clear tier moves") as conn:
                conn.executemany(JOURNAL_DELETE, [(i,) for i in ids])

    def journal_rows(self) -> list[tuple[int, int, str, str, str, str, str, float]]:
        """Every move in flight: ``(id, block_id, key, op, src, dst, state, created)``."""
        return [tuple(r) for r in self._query(JOURNAL_ROWS)]

    def commit_moved(self, row: BlockRow, journal_id: int, next_block_id: int) -> bool:
        """Commit the row of a cache-only block spilled into L3 and close its journal entry (one transaction).

        A spilled block is the key's newest version only while the key has no committed row (a
        cache-only put removes the row it replaces), so the row goes in only if there is none: a
        spill planned from an older version never overwrites what a writer committed since. False
        when it was refused; the journal entry is closed either way.
        """
        with self._write("commit a tier move") as conn:
            conn.execute(SET_META, ("next_block_id", str(next_block_id)))
            inserted = conn.execute(INSERT_NEW_BLOCK, row.to_tuple()).rowcount == 1
            conn.execute(JOURNAL_DELETE, (journal_id,))
        return inserted

    def trim_successors(self, max_rows: int) -> None:
        """Keep only the ``max_rows`` most frequent transitions."""
        with self._write("trim the successor table") as conn:
            conn.execute(TRIM_SUCCESSORS, (max_rows,))

    def successor_counts(self, limit: int) -> list[tuple[str, str, int]]:
        """The ``limit`` most frequent ``(key, next_key, count)`` transitions."""
        return [(str(a), str(b), int(n)) for a, b, n in self._query(SUCCESSOR_ROWS, (limit,))]

    def hot_blocks(self, min_count: int, limit: int) -> list[tuple[str, int, float, int]]:
        """Blocks accessed at least ``min_count`` times: ``(key, count, last access, nbytes)``, hottest first."""
        return [(str(k), int(c), float(t or 0.0), int(n)) for k, c, t, n in self._query(HOT_BLOCKS, (min_count, limit))]

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            try:
                if not self.readonly:
                    self._conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass  # (a full disk): the close below must still run, or the WAL is never checkpointed
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            if self._counter_fd >= 0:
                os.close(self._counter_fd)
                self._counter_fd = -1


def _as_count(row: Any) -> int:
    """The commit_seq value of a ``store_meta`` row (0 when absent or damaged)."""
    text = str(row[0]) if row is not None else ""
    return int(text) if text.isascii() and text.isdigit() else 0


def _read_counter(path: Path) -> int:
    """The commit count recorded beside the catalog (0 when there is none or it is damaged)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(12)
    except OSError:
        return 0
    if len(raw) != 12 or crc32c.crc32c(raw[:8]) != int.from_bytes(raw[8:], "little"):
        return 0
    return int.from_bytes(raw[:8], "little")


def _write_counter(fd: int, seq: int) -> None:
    raw = seq.to_bytes(8, "little")
    try:
        os.pwrite(fd, raw + crc32c.crc32c(raw).to_bytes(4, "little"), 0)  # one page: a kill never tears it
    except OSError:
        pass  # (a full disk cannot refuse 12 bytes in place): a counter behind the catalog is never a false alarm


def _unborn(path: Path) -> bool:
    """Whether no catalog was ever completed at ``path`` (none, or an empty file a crash left).

    An empty file beside a non-empty WAL is not: the WAL may hold the whole catalog.
    """
    try:
        if path.stat().st_size:
            return False
        return path.with_name(path.name + "-wal").stat().st_size == 0
    except FileNotFoundError:
        return True


def schema_version_of(path: Path) -> int:
    """The schema version of the catalog file at ``path``, read without applying migrations (0: no schema)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(conn.execute(USER_VERSION).fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise CatalogError(f"catalog {path} cannot be read ({exc}); restore it from a backup",
                           path=str(path)) from None


def _replaced_row(old: Sequence[Any]) -> BlockRow:
    """The row being replaced or deleted; a damaged one is replaced all the same, its bytes left to recovery."""
    try:
        return BlockRow.from_tuple(old)
    except CorruptBlockError:
        nbytes = old[4] if type(old[4]) is int else 0
        stored = old[13] if type(old[13]) is int else 0
        return BlockRow.stored(old[0], -1, "uint8", (nbytes,), nbytes, 0, durable=bool(old[6]),
                               l3=("raw", None, None, None, None, None, stored, None), tiers=0, created=0.0,
                               updated=0.0, parent=None)


def _prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix`` (None if there is none)."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:
                nxt = 0xE000
            return "".join(chars) + chr(nxt)
    return None


def now() -> float:
    """Wall-clock time for catalog timestamps."""
    return time.time()
