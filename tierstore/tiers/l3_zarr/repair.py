"""Keeping L3's files true to the catalog: recovery at open, shard index checks and rewrites, and the
upgrade from layout 1 (1-D arrays, shard files ``<n>``) to layout 2 without rewriting a chunk.

Only the writer runs these, at open or from ``tierstore verify``/upkeep; this module knows nothing
of the catalog: the caller says what is committed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import crc32c
import numpy as np

from ...errors import UnsafePathError
from ...fsguard import NOFOLLOW
from .files import L3Files
from .layout import GRANULE, PACK_INDEX_BYTES, PACK_SLOTS, Contents, Location, RecoveryReport
from .metadata import fsync_dir, group_meta, write_json
from .shard_format import EMPTY_SLOT, index_bytes, rebuilt_index, valid_index, write_all
from .writer import L3Writer

__all__ = ["L3Repair"]


class L3Repair:
    """Recovery, index upkeep and the layout upgrade of one L3 tier."""

    def __init__(self, files: L3Files, writer: L3Writer) -> None:
        self.files = files
        self.writer = writer

    def pack_slots(self, array: str, shard: int, length: int) -> dict[int, int]:
        """``{byte offset: slot}`` of the chunks in a pack shard, from the index its committed end holds.

        Empty when the index is unreadable (short or failing its crc32c): then its blocks' chunks are
        unknown, which costs zarr readers their address and tierstore nothing (it reads by offset).
        """
        path = self.files.shard_file(array, shard)
        try:
            fd = self.files.descriptors.acquire(path)
        except (OSError, UnsafePathError):
            return {}
        try:
            raw = os.pread(fd, PACK_INDEX_BYTES, length - PACK_INDEX_BYTES) if length >= PACK_INDEX_BYTES else b""
        finally:
            self.files.descriptors.release(path, fd)
        if len(raw) != PACK_INDEX_BYTES or crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            return {}
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(PACK_SLOTS, 2)
        return {int(offset): slot for slot, (offset, _) in enumerate(index) if offset != EMPTY_SLOT}

    def relink(self, shards: Iterable[tuple[str, int]], blocks: Iterable[tuple[Location, int, Contents]]) -> None:
        """First step from layout 1 to 2: every shard file gets its layout-2 name too, every array new metadata.

        Hard links, so no byte is copied and the layout-1 names keep working for whoever reads by them
        until :meth:`drop_layout1_names`, after the catalog committed the new layout. Idempotent: a crash
        in between leaves layout 1 whole, and the next open runs this again.
        """
        extents: dict[str, int] = {}
        folders: set[Path] = set()
        for array, number in shards:
            self._link(self.files.root / array / str(number), self.files.root / array / f"{number}.0")
            extents[array] = max(extents.get(array, 0), number + 1)
            folders.add(self.files.root / array)
        codec_ids = {a: a.removeprefix("packs/") for a in extents}
        for array, count in extents.items():
            self.writer.restore_meta(Location(array, 0, 0, (), GRANULE, codec_ids[array]), 0, pack_shards=count)
        for loc, nbytes, contents in blocks:
            self._link(self.files.root / loc.array / "0", self.files.root / loc.array / "0.0")
            self.writer.restore_meta(loc, nbytes, contents=contents)
            folders.add(self.files.root / loc.array)
        if self.files.fsync:
            for folder in folders:
                fsync_dir(folder)

    def _link(self, old: Path, new: Path) -> None:
        if not self.files.contained(old):
            return  # a link, or behind one: never followed (recovery reported it)
        try:
            os.link(old, new, follow_symlinks=False)
        except FileExistsError:
            pass  # a relink a crash interrupted got this far
        except FileNotFoundError:
            pass  # missing since before: recovery reported it

    def drop_layout1_names(self, shards: Iterable[tuple[str, int]], arrays: Iterable[str]) -> None:
        """Last step to layout 2, after the catalog committed it: the old names go, this handle uses the new."""
        names = [self.files.root / a / str(n) for a, n in shards] + [self.files.root / a / "0" for a in arrays]
        self.files.descriptors.discard([str(p) for p in names])  # reads reopen by the new names
        for path in names:
            if self.files.contained(path):
                path.unlink(missing_ok=True)
        self.files.use_layout(2)
        write_json(self.files.root / "zarr.json", group_meta({"tierstore": {"layout": 2}}), sync=self.files.fsync)
        if self.files.fsync:
            for folder in {p.parent for p in names} | {self.files.root}:
                fsync_dir(folder)

    def pack_shard_files(self) -> set[tuple[str, int]]:
        """``(array, number)`` of every pack shard file there is (names only: no stat per file)."""
        packs = self.files.root / "packs"
        found: set[tuple[str, int]] = set()
        for folder in (p for p in packs.iterdir() if p.is_dir()) if packs.is_dir() else []:
            numbers = (self.files.shard_number(name) for name in os.listdir(folder))
            found.update((f"packs/{folder.name}", n) for n in numbers if n is not None)
        return found

    def shard_end(self, array: str, shard: int, extent: int) -> int | None:
        """How long a pack shard is by its bytes: the end of its first valid index after ``extent``.

        ``extent`` is where the last committed block in it ends; the index of that block's commit
        follows it unless later (since deleted) appends did. Without a valid index there, the
        whole file counts (nothing a block may need is ever cut). None when the file is gone.
        """
        try:
            data = self.files.shard_path(array, shard).read_bytes()
        except FileNotFoundError:
            return None
        for start in range(max(extent, 0), len(data) - PACK_INDEX_BYTES + 1):
            if valid_index(data, start, PACK_SLOTS):
                return start + PACK_INDEX_BYTES
        return len(data)

    def index_problem(self, loc: Location, length: int, chunks: list[tuple[int, int]],
                      chunk_of: dict[tuple[int, int], int] | None = None) -> str | None:
        """What is wrong with the shard index zarr readers use (None: nothing).

        ``length`` is the committed length of the shard file, ``chunks`` the ``(offset, size)``
        of every chunk a live block has in it. tierstore reads by the catalog's offsets, so a bad
        index only misleads zarr readers; :meth:`write_index` writes it again.
        """
        slots = PACK_SLOTS if loc.array.startswith("packs/") else self.block_slots(loc, length, chunk_of)
        size = slots * 16 + 4
        path = self.files.shard_path(loc.array, loc.shard)
        try:
            with open(path, "rb") as fh:
                fh.seek(max(length - size, 0))
                data = fh.read(size)
        except FileNotFoundError:
            return None  # the block check reports the missing file
        if len(data) != size or not valid_index(data, 0, slots, end=length - size):
            return f"the shard index at byte {length - size} fails its crc32c or points past it"
        entries = [(int(o), int(n)) for o, n in np.frombuffer(data[:-4], dtype="<u8").reshape(-1, 2)]
        listed = set(entries)
        absent = [c for c in chunks if c not in listed]
        if absent:
            return f"the shard index does not list {len(absent)} chunk(s) of live blocks (first at {absent[0][0]})"
        first = loc.shard * PACK_SLOTS if loc.array.startswith("packs/") else 0
        moved = [(c, n) for c, n in (chunk_of or {}).items() if not 0 <= n - first < slots or entries[n - first] != c]
        if moved:  # zarr readers that follow the catalog's l3_chunk would read another chunk's bytes
            (offset, _), chunk = moved[0]
            return f"the shard index puts {len(moved)} chunk(s) elsewhere than their l3_chunk (first at {offset}, " \
                   f"chunk {chunk})"
        return None

    def write_index(self, loc: Location, length: int, chunks: list[tuple[int, int]],
                    chunk_of: dict[tuple[int, int], int] | None = None) -> None:
        """Write the shard index at the end of ``loc``'s shard again from the chunks of its live blocks.

        ``chunk_of`` gives the chunk index (along axis 0 of the array) of the chunks whose blocks know
        theirs (the catalog's ``l3_chunk``): they go to exactly that slot, where zarr readers look for
        them. The rest keep their slots where the old index still names them, else take, in file
        order, the slots between their neighbours (appends fill slots in file order), else stay empty.
        """
        packed = loc.array.startswith("packs/")
        slots = PACK_SLOTS if packed else self.block_slots(loc, length, chunk_of)
        first = loc.shard * PACK_SLOTS if packed else 0
        known = {c: n - first for c, n in (chunk_of or {}).items() if 0 <= n - first < slots}
        size = slots * 16 + 4
        path = self.files.shard_path(loc.array, loc.shard)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            old = np.frombuffer(os.pread(fd, size - 4, length - size), dtype="<u8").reshape(-1, 2)
            index = rebuilt_index(old, slots, sorted(set(chunks)), known)
            write_all(fd, [index_bytes(index)], length - size)
            if self.files.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def block_slots(self, loc: Location, length: int, chunk_of: dict[tuple[int, int], int] | None) -> int:
        """How many inner chunks the index of a large-block array's shard has (a commit's blocks share one).

        The count whose index bytes at the file's end hold their crc32c, from the live blocks' extent up
        (dead blocks of the run count too); else the shard shape its ``zarr.json`` says; else the extent.
        """
        extent = max(chunk_of.values()) + 1 if chunk_of else len(loc.sizes)
        path = self.files.shard_path(loc.array, loc.shard)
        try:
            with open(path, "rb") as fh:
                tail = min(length, 16 * (extent + 4096) + 4)
                fh.seek(length - tail)
                data = fh.read(tail)
        except OSError:
            return extent
        for count in range(extent, (len(data) - 4) // 16 + 1):
            if valid_index(data, len(data) - 16 * count - 4, count, end=length - 16 * count - 4):
                return count
        try:
            doc = json.loads((self.files.root / loc.array / "zarr.json").read_text(encoding="utf-8"))
            shard = doc["chunk_grid"]["configuration"]["chunk_shape"][0]
            inner = doc["codecs"][0]["configuration"]["chunk_shape"][0]
            if isinstance(shard, int) and isinstance(inner, int) and inner > 0 and shard % inner == 0:
                return max(extent, shard // inner)
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            pass
        return extent

    def recover(self, shard_lengths: dict[tuple[str, int], int], live_arrays: set[str]) -> RecoveryReport:
        """Bring the files in line with what the catalog committed (writer only, at open).

        Shard files the catalog does not know are orphans of an uncommitted write and go; a shard
        longer than committed had a torn append and is cut back; a known file that is missing (or,
        for the shard last appended to, short) is reported, never invented. Only the highest
        committed shard of a pack can have a torn tail (appends never go back to older shards), so
        only it is stat()ed: open() stays fast with many thousands of shard files. A symbolic
        link (a pack folder, a shard file, a block folder or file) is listed in ``links`` and left
        alone: nothing is removed, cut or read through it.
        """
        report = RecoveryReport()
        packs = self.files.root / "packs"
        seen: set[tuple[str, int]] = set()
        last: dict[str, int] = {}
        for array, number in shard_lengths:
            last[array] = max(last.get(array, -1), number)
        for folder in sorted(p for p in packs.iterdir() if p.is_dir() or p.is_symlink()) if packs.exists() else []:
            array = f"packs/{folder.name}"
            if folder.is_symlink():
                report.links.append(str(folder))
                seen.update(k for k in shard_lengths if k[0] == array)  # listed once, as a link
                continue
            for entry in folder.iterdir():
                if entry.is_symlink():
                    report.links.append(str(entry))
                    if (linked := self.files.shard_number(entry.name)) is not None:  # listed once, as a link
                        seen.add((array, linked))
                    continue
                if entry.name == "zarr.json":
                    continue
                found = self.files.shard_number(entry.name)
                key = (array, found) if found is not None else None
                if key is None or key not in shard_lengths:
                    entry.unlink()
                    report.removed_files.append(str(entry))
                    continue
                seen.add(key)
                if key[1] < last[array]:
                    continue
                size, want = entry.stat().st_size, shard_lengths[key]
                if size > want:
                    fd = os.open(entry, os.O_WRONLY | NOFOLLOW)
                    try:
                        os.ftruncate(fd, want)
                    finally:
                        os.close(fd)
                    report.truncated.append(str(entry))
                elif size < want:
                    report.missing.append(f"{entry} ({size} of {want} bytes)")
        report.missing.extend(f"{self.files.shard_path(a, n)}" for a, n in shard_lengths if (a, n) not in seen)
        blocks = self.files.root / "blocks"
        present: set[str] = set()
        for entry in blocks.iterdir() if blocks.exists() else []:
            name = f"blocks/{entry.name}"
            shard = entry / f"0{self.files.shard_suffix}"
            if entry.is_symlink() or shard.is_symlink():
                report.links.append(str(entry if entry.is_symlink() else shard))
                present.add(name)  # listed once, as a link, not also as missing
                continue
            if entry.name == "zarr.json":
                continue
            if name not in live_arrays:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                report.removed_files.append(str(entry))
            elif shard.exists():
                present.add(name)
                for extra in entry.glob("*.tmp"):
                    extra.unlink()
                old = entry / "0"
                if self.files.shard_suffix and old.is_file() and not old.is_symlink():  # left by an upgrade cut short
                    old.unlink()
                    report.removed_files.append(str(old))
        report.missing.extend(str(self.files.root / a) for a in sorted(live_arrays - present))
        if self.files.fsync and (report.removed_files or report.truncated):
            fsync_dir(self.files.root)
        return report
