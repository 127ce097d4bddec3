"""Checking a whole store, and repairing what can be repaired (``tierstore verify [--fix]``).

A check reads every block from L3 and compares its crc32c with the catalog,
then walks the files: catalog rows whose data is gone, data no row points at,
shard files longer than committed (a torn append), moves left in the journal,
leftover temporary files, and the schema version. It holds the writer lock,
so no writer changes the store under it, and it changes nothing unless asked.

A repair (``fix=True``) never hides a loss: blocks whose bytes are damaged or
missing are dropped from the catalog and listed in :attr:`VerifyReport.lost`;
everything else it does (orphans removed, torn tails cut, journal rows and
temporary files dropped) is listed in :attr:`VerifyReport.repaired`. The store
is checked again afterwards and what is still wrong is in ``remaining``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..catalog import SCHEMA_VERSION, BlockRow, Catalog
from ..catalog.sqlite_catalog import schema_version_of
from ..engine.transaction import location_of
from ..engine.writer_lock import WriterLock
from ..errors import (
    CatalogError,
    CorruptBlockError,
    SchemaVersionError,
    StoreNotFoundError,
    UnsafePathError,
    UnsupportedTensorError,
)
from ..fsguard import CATALOG_ENTRIES, NOFOLLOW, STORE_FOLDERS, contained, refuse_links
from ..tensors import dtype_from_name
from ..tiers.l3_zarr import LAYOUT, PACK_INDEX_BYTES, Contents, Location, ZarrL3
from .recovery import rebuild_shard_rows, refuse_orphaned_data
from .warm_restart import TMP_INDEX_NAME

__all__ = ["Problem", "VerifyReport", "verify", "PROBLEM_KINDS"]

CATALOG_NAME = "catalog.sqlite"
_OWN_ARRAY = re.compile(r"blocks/[0-9a-f]{16}")
GROUPS = ("l3/zarr.json", "l3/packs/zarr.json", "l3/blocks/zarr.json")
TEMP_SUFFIXES = (".tmp", ".partial")
"""Names a writer gives files it has not finished (zarr.json.tmp, zarr's .partial); not ``l2.index.tmp``,
which only costs a cold L2 and goes at the next open."""

PROBLEM_KINDS = ("schema", "rollback", "corrupt", "missing", "orphan", "torn", "stale", "shard", "index", "meta",
                 "journal", "temp", "link")
"""``corrupt``: bytes fail their checksum or do not decode, or the row's metadata cannot describe
them; ``missing``: a row's data file is gone; ``orphan``: a data file no row points at; ``torn``: a
shard longer than committed; ``stale``: a shard row whose file is gone (with no block left in it);
``shard``: a shard row missing or shorter than the blocks in the file need (rebuilt from the bytes);
``index``: a shard's zarr index is damaged; ``meta``: an array's ``zarr.json`` is missing or
damaged (zarr readers need both, tierstore does not); ``journal``: a
move left in flight; ``temp``: an unfinished temporary file; ``schema``: an old catalog schema;
``rollback``: the catalog lost commits it had acknowledged (a damaged WAL; --fix acknowledges it);
``link``: a symbolic link in the store (never followed; ``--fix`` removes the link itself, never what it
points at, and drops the blocks whose bytes it stood for as lost)."""

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a store."""

    kind: str
    """One of :data:`PROBLEM_KINDS`."""
    subject: str
    """The key (``corrupt``, ``missing``, ``journal``) or the path relative to the store."""
    detail: str


@dataclass(slots=True)
class VerifyReport:
    """What :func:`verify` checked, found and (with ``fix``) did."""

    path: str
    schema_version: int
    blocks: int = 0
    """Blocks whose bytes were read and checked."""
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    fixed: bool = False
    repaired: list[str] = field(default_factory=list)
    """What the repair did, one line each (nothing here lost committed data)."""
    lost: list[str] = field(default_factory=list)
    """Keys dropped because their bytes were damaged or missing: restore them from elsewhere."""
    remaining: list[Problem] = field(default_factory=list)
    """Problems a second check still found after the repair."""
    removed_links: list[str] = field(default_factory=list)
    """Links the repair removed (paths relative to the store)."""

    @property
    def ok(self) -> bool:
        """Whether the store is sound now (after the repair, if one ran)."""
        return not (self.remaining if self.fixed else self.problems)

    def by_kind(self) -> dict[str, int]:
        """How many problems of each kind were found."""
        counts = dict.fromkeys(PROBLEM_KINDS, 0)
        for p in self.problems:
            counts[p.kind] += 1
        return counts


def verify(path: str | os.PathLike[str], *, fix: bool = False, progress: Progress | None = None) -> VerifyReport:
    """Check every block and file of the store at ``path``; repair what can be repaired if ``fix``.

    The store must not be open for writing elsewhere (``StoreLockedError`` otherwise). A store
    whose catalog is newer than this tierstore raises ``SchemaVersionError``; one whose catalog or
    L3 folders are symbolic links raises ``UnsafePathError`` (they cannot be checked without
    following the links). A ``LOCK`` link is reported, and a check then runs without the lock
    (no writer opens a store with one); ``fix`` removes the link and takes the lock.
    """
    store = Path(path)
    catalog_path = store / CATALOG_NAME
    refuse_links(store, STORE_FOLDERS + CATALOG_ENTRIES, what="verify the store")
    if not catalog_path.is_file():
        raise StoreNotFoundError(f"no tierstore store at {store} (no {CATALOG_NAME})", path=str(store))
    lock_link = _lock_link(store)
    if lock_link is not None and fix:
        os.unlink(store / "LOCK")  # the link, so that the lock can be taken; what it points at stays
    lock = None if lock_link is not None and not fix else WriterLock(store)
    try:
        report = _check(store, progress)
        if lock_link is not None and fix:
            report.problems.insert(0, lock_link)
            report.removed_links.append("LOCK")
            report.repaired.append("removed link LOCK (what it pointed at is untouched)")
        if fix and report.problems:
            _repair(store, report)
            again = _check(store, None)
            report.remaining = again.problems
            report.fixed = True
        return report
    finally:
        if lock is not None:
            lock.release()


def _lock_link(store: Path) -> Problem | None:
    lock = store / "LOCK"
    if not lock.is_symlink():
        return None
    return Problem("link", "LOCK", f"symbolic link to {os.readlink(lock)!r}; tierstore never follows links in "
                   "a store (--fix removes the link only)")


def _check(store: Path, progress: Progress | None) -> VerifyReport:
    catalog_path = store / CATALOG_NAME
    version = schema_version_of(catalog_path)
    report = VerifyReport(str(store), version)
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(f"catalog {catalog_path} has schema version {version}, newer than this "
                                 f"tierstore knows ({SCHEMA_VERSION}); upgrade tierstore to verify it",
                                 path=str(catalog_path))
    if version == 0:
        refuse_orphaned_data(store, catalog_path)  # no schema beside data: a lost catalog, not a new store
        if any((store / "l3" / sub).is_dir() and any(p.name != "zarr.json" for p in (store / "l3" / sub).iterdir())
               for sub in ("packs", "blocks")):
            raise CatalogError(f"catalog {catalog_path} has no tables but the store holds L3 data; restore the "
                               "catalog from a backup (a repair now would delete the data as orphans)",
                               path=str(catalog_path))
    if version < SCHEMA_VERSION:
        report.problems.append(Problem("schema", CATALOG_NAME, f"schema version {version}, current is "
                                       f"{SCHEMA_VERSION}; --fix upgrades it"))
        return report
    catalog = Catalog(catalog_path, readonly=True)
    l3 = ZarrL3(store, readonly=True, layout=catalog.l3_layout() or LAYOUT)
    try:
        if catalog.rollback_note:
            report.problems.append(Problem("rollback", CATALOG_NAME, catalog.rollback_note))
        rows = []
        for raw in catalog.raw_block_rows():
            try:
                row = BlockRow.from_tuple(raw)
                _check_meta(row)
                rows.append(row)
            except (CorruptBlockError, ValueError, TypeError) as exc:  # a row no block could have
                report.problems.append(Problem("corrupt", str(raw[0]), f"catalog row is damaged ({exc})"))
        _check_blocks(l3, rows, report, progress)
        _check_files(store, l3, catalog, report)
        _check_indexes(l3, catalog, rows, report)
        for jid, block_id, key, op, src, dst, state, _created in catalog.journal_rows():
            report.problems.append(Problem("journal", key, f"move #{jid} {op} {src}->{dst} of block "
                                           f"{block_id} left in state {state!r}"))
    finally:
        l3.close()
        catalog.close()
    return report


def _check_meta(row: BlockRow) -> None:
    """ValueError unless ``get`` could make a tensor of the row: a known dtype whose shape fills nbytes."""
    try:
        itemsize = dtype_from_name(row.dtype).itemsize
    except UnsupportedTensorError:
        raise ValueError(f"dtype {row.dtype!r:.40} is not one tierstore stores") from None
    if itemsize * math.prod(row.shape) != row.nbytes:
        raise ValueError(f"{row.dtype} of shape {list(row.shape)} is {itemsize * math.prod(row.shape)} bytes, "
                         f"the row says {row.nbytes}")


def _check_indexes(l3: ZarrL3, catalog: Catalog, rows: list[BlockRow], report: VerifyReport) -> None:
    """Each shard's zarr index (crc32c, and listing every live chunk): zarr readers trust it."""
    lengths = catalog.shard_lengths()
    short = {(a, s) for a, s, _, _ in catalog.short_shards(PACK_INDEX_BYTES)}  # reported as "shard"
    shards: dict[tuple[str, int], BlockRow] = {}
    for row in rows:
        if row.l3_array is not None and row.l3_shard is not None:
            shards.setdefault((row.l3_array, row.l3_shard), row)
    for (array, number), row in sorted(shards.items()):
        loc = location_of(row)
        path = l3.shard_path(array, number)
        length = lengths.get((array, number)) if array.startswith("packs/") else _file_size(path)
        if length is None or (array, number) in short:
            continue  # no file (reported as "missing") or no trustworthy length (reported as "shard")
        problem = l3.index_problem(loc, length, catalog.shard_chunks(array, number),
                                   catalog.shard_chunk_index(array, number))
        if problem is not None:
            report.problems.append(Problem("index", _rel(l3, array, number), f"{problem}; --fix writes it again "
                                           "from the blocks in the shard"))


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


_BATCH_BYTES = 64 << 20
"""Bytes of blocks :func:`_check_blocks` reads through one ``read_many`` (the read-ahead pipeline)."""
_BATCH_ROWS = 512


def _check_blocks(l3: ZarrL3, rows: list[BlockRow], report: VerifyReport, progress: Progress | None) -> None:
    """Read every block and compare its crc32c with the catalog's, a batch of rows at a time.

    A batch goes through ``ZarrL3.read_many``, so the disk reads the next blocks while earlier
    ones decode; the crc32c it returns per block is the check (no second pass over the bytes).
    """
    buf = np.empty(0, dtype=np.uint8)
    total = sum(r.nbytes for r in rows)
    metas: set[str] = set()
    start = 0
    while start < len(rows):
        end, size = start + 1, rows[start].nbytes
        while end < len(rows) and end - start < _BATCH_ROWS and size + rows[end].nbytes <= _BATCH_BYTES:
            size += rows[end].nbytes
            end += 1
        if size > buf.nbytes:
            buf = np.empty(max(size, 2 * buf.nbytes), dtype=np.uint8)
        batch, offset = rows[start:end], 0
        requests: list[tuple[Location, np.ndarray] | None] = []
        for row in batch:
            loc = location_of(row)
            if row.nbytes and not loc.sizes:
                requests.append(None)
            else:
                requests.append((loc, buf[offset:offset + row.nbytes]))
            offset += row.nbytes
        results = iter(l3.read_many([r for r in requests if r is not None]))
        for row, request in zip(batch, requests, strict=True):
            _check_one(l3, row, None if request is None else next(results), report, metas)
            report.blocks += 1
            report.bytes_checked += row.nbytes
            if progress is not None:
                progress(report.bytes_checked, total)
        start = end


def _check_one(l3: ZarrL3, row: BlockRow, result: int | BaseException | None, report: VerifyReport,
               metas: set[str]) -> None:
    """Record what is wrong with one block: ``result`` is what ``read_many`` gave for it (None: not read)."""
    loc = location_of(row)
    if result is None:
        report.problems.append(Problem("missing", row.key, "the catalog row has no L3 location"))
    elif isinstance(result, FileNotFoundError):
        report.problems.append(Problem("missing", row.key, f"{_rel(l3, loc.array, loc.shard)} is gone"))
    elif isinstance(result, UnsafePathError):  # its bytes are not in the store (the link is a problem of its own)
        metas.add(loc.array)
        report.problems.append(Problem("missing", row.key, f"{_rel(l3, loc.array, loc.shard)} is a "
                                       "symbolic link or lies behind one"))
    elif isinstance(result, CorruptBlockError):
        report.problems.append(Problem("corrupt", row.key, result.message))
    elif isinstance(result, BaseException):
        raise result  # an I/O error, as the read raised it before
    elif result != row.checksum:
        report.problems.append(Problem("corrupt", row.key, f"checksum mismatch in {loc.array}"))
    if loc.array and loc.array not in metas:
        metas.add(loc.array)
        if not _meta_ok(l3.root / loc.array / "zarr.json"):
            report.problems.append(Problem("meta", f"l3/{loc.array}/zarr.json", f"missing or damaged; --fix "
                                           f"writes it again from the catalog (block {row.key!r})"))


def _meta_ok(path: Path, node_type: str = "array") -> bool:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("zarr_format") == 3 and doc.get("node_type") == node_type


def _rel(l3: ZarrL3, array: str, shard: int) -> str:
    return f"l3/{l3.shard_path(array, shard).relative_to(l3.root)}"


def _check_files(store: Path, l3: ZarrL3, catalog: Catalog, report: VerifyReport) -> None:
    lengths = catalog.shard_lengths()
    live = catalog.live_arrays()
    for here, dirnames, filenames in os.walk(store):  # never into a linked folder
        for name in sorted(dirnames + filenames):
            entry = Path(here) / name
            rel = str(entry.relative_to(store))
            if entry.is_symlink():
                report.problems.append(Problem("link", rel, f"symbolic link to {os.readlink(entry)!r}; tierstore "
                                               "never follows links in a store (--fix removes the link only)"))
            elif name in filenames and name.endswith(TEMP_SUFFIXES) and entry != store / TMP_INDEX_NAME:
                report.problems.append(Problem("temp", rel, "unfinished temporary file"))
    for group in GROUPS:
        if (store / group).parent.is_dir() and not _meta_ok(store / group, "group"):
            report.problems.append(Problem("meta", group, "zarr group metadata missing or damaged"))
    short = {(a, s): (extent, n) for a, s, extent, n in catalog.short_shards(PACK_INDEX_BYTES)}
    packs = l3.root / "packs"
    for folder in sorted(p for p in packs.iterdir() if p.is_dir() and not p.is_symlink()) if packs.is_dir() else []:
        array = f"packs/{folder.name}"
        for entry in sorted(folder.iterdir()):
            if entry.name == "zarr.json" or entry.name.endswith(TEMP_SUFFIXES) or entry.is_symlink():
                continue
            rel = str(entry.relative_to(store))
            number = l3.shard_number(entry.name)
            key = (array, number) if number is not None else None
            if key is not None and key in short:  # blocks are in it: never an orphan, never torn
                extent, length = short[key]
                was = "has no catalog row" if length is None else f"has a catalog row of {length} bytes"
                report.problems.append(Problem("shard", rel, f"{was} but blocks in it end at {extent} "
                                               f"({_size(entry)} bytes); --fix rebuilds the row from the bytes"))
            elif key is None or key not in lengths:
                report.problems.append(Problem("orphan", rel, f"shard file unknown to the catalog "
                                               f"({_size(entry)} bytes)"))
            elif entry.stat().st_size > lengths[key]:
                report.problems.append(Problem("torn", rel, f"{entry.stat().st_size} bytes, committed "
                                               f"{lengths[key]}"))
    used = catalog.used_shards()
    for array, number in sorted(lengths):
        if (array, number) not in used and not l3.shard_path(array, number).exists():
            report.problems.append(Problem("stale", _rel(l3, array, number), "the catalog lists this shard file, "
                                           "which is gone; no block is in it"))
    blocks = l3.root / "blocks"
    for entry in sorted(blocks.iterdir()) if blocks.is_dir() else []:
        if entry.name == "zarr.json" or entry.name.endswith(TEMP_SUFFIXES) or entry.is_symlink():
            continue
        if f"blocks/{entry.name}" not in live:
            report.problems.append(Problem("orphan", str(entry.relative_to(store)),
                                           f"block array no row points at ({_size(entry)} bytes)"))


def _live_end(catalog: Catalog, array: str, shard: int) -> int:
    """Where the last chunk a block row points at in this shard ends, plus its index."""
    chunks = catalog.shard_chunks(array, shard)
    return max((o + n for o, n in chunks), default=0) + PACK_INDEX_BYTES


def _shard_of(l3: ZarrL3, subject: str) -> tuple[str, int]:
    """``(array, shard)`` of a problem's subject ``l3/<array>/<shard file name>``."""
    array, _, name = subject.removeprefix("l3/").rpartition("/")
    return array, l3.shard_number(name) or 0


def _rewrite_index(l3: ZarrL3, catalog: Catalog, subject: str, lengths: dict[tuple[str, int], int]) -> None:
    array, shard = _shard_of(l3, subject)
    first = catalog.first_row_in_shard(array, shard)
    if first is None:
        return
    path = l3.shard_path(array, shard)
    length = lengths[(array, shard)] if array.startswith("packs/") else path.stat().st_size
    l3.write_index(location_of(first), length, catalog.shard_chunks(array, shard),
                   catalog.shard_chunk_index(array, shard))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _unlink_links(store: Path, report: VerifyReport) -> None:
    """Remove the links the check found (the links themselves: what they point at stays as it is)."""
    for problem in report.problems:
        link = store / problem.subject
        if problem.kind != "link" or problem.subject in report.removed_links or not link.is_symlink():
            continue
        if link.parent == store or contained(store, link.parent):  # the folder holding it is the store's
            os.unlink(link)
            report.removed_links.append(problem.subject)
            report.repaired.append(f"removed link {problem.subject} (what it pointed at is untouched)")


def _repair(store: Path, report: VerifyReport) -> None:
    _unlink_links(store, report)  # first: nothing below may write or delete through one
    catalog_path = store / CATALOG_NAME
    catalog = Catalog(catalog_path)  # applies pending schema migrations
    if any(p.kind == "schema" for p in report.problems):
        report.repaired.append(f"upgraded the catalog schema from version {report.schema_version} to "
                               f"{SCHEMA_VERSION}")
    groups = [p.subject for p in report.problems if p.kind == "meta" and p.subject in GROUPS]
    for group in groups:
        (store / group).unlink(missing_ok=True)
    layout = catalog.l3_layout() or LAYOUT
    l3 = ZarrL3(store, readonly=True, layout=layout)
    l3_rw = ZarrL3(store, layout=layout)  # writes missing group metadata
    report.repaired.extend(f"wrote {group} again" for group in groups)
    try:
        if catalog.rollback_note:
            report.repaired.append(f"acknowledged: {catalog.rollback_note}")
            report.lost.append("(commits the catalog lost: see repaired)")
            catalog.acknowledge_rollback()
        lost = sorted({p.subject for p in report.problems if p.kind in ("corrupt", "missing")})
        if lost:
            arrays = catalog.own_arrays_of(lost)
            catalog.drop_blocks(lost)
            shared = catalog.arrays_in_use(a for a in arrays if isinstance(a, str))  # other blocks of a commit
            for array in (a for a in arrays if a not in shared):
                if (isinstance(array, str) and _OWN_ARRAY.fullmatch(array)  # never a path a damaged row made up
                        and contained(store, l3.root / array)):
                    shutil.rmtree(l3.root / array, ignore_errors=True)
            report.lost.extend(lost)
            report.repaired.append(f"dropped {len(lost)} damaged block(s) from the catalog: {', '.join(lost)}")
        journal = catalog.journal_rows()
        if journal:
            catalog.drop_journal_rows([r[0] for r in journal])
            report.repaired.append(f"dropped {len(journal)} leftover journal row(s); committed blocks are "
                                   "unaffected (a move copies before it commits)")
        if any(p.kind == "shard" for p in report.problems):
            report.repaired.extend(f"rebuilt the shard row of {line}" for line in rebuild_shard_rows(catalog, l3))
        lengths = catalog.shard_lengths()
        used = catalog.used_shards()
        stale = [(a, n) for (a, n) in lengths if (a, n) not in used and not l3.shard_path(a, n).exists()]
        if stale:  # including those whose blocks were just dropped as lost
            catalog.drop_shard_rows(stale)
            report.repaired.append(f"dropped {len(stale)} catalog row(s) of shard files that are gone: "
                                   + ", ".join(_rel(l3, a, n) for a, n in sorted(stale)))
        for problem in report.problems:
            if problem.kind == "meta" and problem.subject not in GROUPS:
                array = problem.subject.removeprefix("l3/").removesuffix("/zarr.json")
                first = catalog.first_row_in_array(array)
                if first is not None and array.startswith("blocks/"):  # one block, or a commit's run of them
                    l3_rw.restore_run_meta([(location_of(r), r.nbytes, Contents(r.key, r.dtype, r.shape))
                                            for r in catalog.rows_in_array(array)])
                    report.repaired.append(f"wrote {problem.subject} again")
                elif first is not None:
                    shards = 1 + max((n for a, n in lengths if a == array), default=0)
                    l3_rw.restore_meta(location_of(first), first.nbytes,
                                       contents=Contents(first.key, first.dtype, first.shape), pack_shards=shards)
                    report.repaired.append(f"wrote {problem.subject} again")
            if problem.kind == "meta":
                continue
            target = store / problem.subject
            if problem.kind == "index":
                _rewrite_index(l3_rw, catalog, problem.subject, lengths)
                report.repaired.append(f"wrote the shard index of {problem.subject} again")
            if problem.kind in ("orphan", "temp", "torn", "shard") and not contained(store, target):
                continue  # became a link since the check: leave it to the next check
            if problem.kind in ("orphan", "temp") and target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
                report.repaired.append(f"removed {problem.kind} {problem.subject}")
            elif problem.kind in ("torn", "shard"):
                array, shard = _shard_of(l3, problem.subject)
                keep = _live_end(catalog, array, shard)
                committed = lengths.get((array, shard), 0)
                if committed >= keep and target.stat().st_size > committed:
                    fd = os.open(target, os.O_WRONLY | NOFOLLOW)
                    try:
                        os.ftruncate(fd, committed)  # past every byte a block row points at
                    finally:
                        os.close(fd)
                    report.repaired.append(f"cut torn append of {problem.subject} back to its committed length")
    finally:
        l3.close()
        l3_rw.close()
        catalog.close()
