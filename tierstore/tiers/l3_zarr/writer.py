"""Writing L3: small blocks appended to their codec's pack, a commit's large blocks to one array (a run).

Small blocks are appended to the active shard of their codec's pack: an append writes the new
chunks, then (at :meth:`L3Writer.prepare`) a fresh index after them, so the file stays a valid
shard after every commit and a torn append is cut off on recovery by truncating to the length the
catalog committed. The large blocks of one commit with one codec and inner chunk size are appended,
in put order and each from a chunk boundary, to one array named by the first of them (a run), in
~1 MiB inner chunks encoded on the codec pool; :meth:`L3Writer.prepare` writes its shard index and
``zarr.json``. A raw large block is an array of its own (streamed weights are mapped, and a map
may trust cached pages only of a block alone in its file), as is a spill (:meth:`L3Writer.write_now`),
complete at once.
Nothing written is durable before :meth:`L3Writer.prepare` and the catalog commit;
:meth:`L3Writer.rollback` undoes it. Not thread-safe: the store serialises writers.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import CorruptBlockError, UnsafePathError
from ...fsguard import NOFOLLOW
from ..codecs import MIN_RATIO, RAW, Codec, codec_from_id
from .codec_pool import codec_pool
from .files import L3Files
from .layout import ARRAY_CHUNK, BATCH, EMPTY_LOCATION, GRANULE, PACK_MAX, PACK_SLOTS, Contents, Location
from .metadata import block_meta, fsync_dir, pack_meta, run_meta, write_json
from .shard_format import EMPTY_SLOT, index_bytes, valid_index, write_all

__all__ = ["L3Writer"]

_BLOCK_ARRAY = re.compile(r"blocks/[0-9a-f]{16}")


@dataclass(slots=True)
class _Shard:
    array: str
    number: int
    path: Path
    fd: int
    length: int
    slot: int
    index: np.ndarray
    committed_length: int
    committed_slot: int
    committed_index: np.ndarray
    created: bool


def _chunk(data: np.ndarray, i: int, inner: int) -> np.ndarray:
    """Inner chunk ``i`` of ``data``; the last one padded to ``inner`` (zarr decodes every chunk to full size)."""
    piece = data[i * inner:(i + 1) * inner]
    if piece.nbytes < inner:
        padded = np.zeros(inner, dtype=np.uint8)
        padded[:piece.nbytes] = piece
        piece = padded
    return piece


def _index_of(sizes: list[int]) -> np.ndarray:
    """The shard index of chunks of ``sizes`` written back to back from offset 0."""
    index = np.empty((len(sizes), 2), dtype=np.uint64)
    index[:, 1] = sizes
    index[:, 0] = np.concatenate(([0], np.cumsum(sizes[:-1], dtype=np.int64)))
    return index


@dataclass(slots=True)
class _Run:
    """The array the large blocks of one commit with one codec and inner chunk size are appended to."""

    array: str
    folder: Path
    fd: int
    codec: Codec
    inner: int
    offset: int = 0
    sizes: list[int] = field(default_factory=list)
    """Encoded size of every inner chunk in the file so far, in file order."""
    blocks: list[tuple[int, int, Contents | None]] = field(default_factory=list)
    """``(first chunk, bytes, contents)`` of each block, in put order."""


class L3Writer:
    """The write side of one L3 tier (a read-only tier has one that is never used)."""

    def __init__(self, files: L3Files) -> None:
        self.files = files
        self._pack_extent: dict[str, int] = {}
        """Shards each pack's ``zarr.json`` covers, as this handle last wrote it."""
        self._grown: dict[str, Codec] = {}
        """Packs that started a shard past their extent since :meth:`prepare` last wrote their ``zarr.json``."""
        self._next_shard: dict[str, int] = {}
        self._active: dict[str, _Shard] = {}
        self._touched: dict[tuple[str, int], _Shard] = {}
        self._new_arrays: list[Path] = []
        self._dirs_to_sync: set[Path] = set()
        self._runs: dict[tuple[str, int], _Run] = {}
        """``(codec id, inner chunk bytes)`` -> the array this commit's large blocks of that kind go to."""

    def remove_shards(self, shards: Iterable[tuple[str, int]]) -> int:
        """Delete shard files the catalog no longer knows (after its commit); returns the bytes freed.

        Their read descriptors are closed at once, or by the last read still using one, so the
        disk space comes back now rather than when the store closes.
        """
        freed = 0
        paths = []
        for array, number in shards:
            path = self.files.shard_path(array, number)
            if not self.files.contained(path):
                continue  # a link, or behind one: not the store's file (verify reports it)
            try:
                freed += path.lstat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            paths.append(str(path))
        self.files.descriptors.discard(paths)
        if paths and self.files.fsync:
            for folder in {Path(p).parent for p in paths}:
                fsync_dir(folder)
        return freed

    def start_shards_after(self, last: dict[str, int]) -> None:
        """Appends go to fresh shard numbers after those the catalog knows (one per pack)."""
        for array, number in last.items():
            self._next_shard[array] = max(self._next_shard.get(array, 0), number + 1)

    # -- writing --------------------------------------------------------------------------------

    def write(self, block_id: int, data: np.ndarray, codec: Codec, contents: Contents | None = None) -> Location:
        """Write a block's bytes (flat uint8); durable only after :meth:`prepare` and the catalog commit.

        ``contents`` names what a large block's array holds (its attributes); packed blocks share an array.
        """
        nbytes = data.nbytes
        if nbytes == 0:
            return EMPTY_LOCATION
        if nbytes <= PACK_MAX:
            return self._write_packed(data, codec)
        return self._write_array(block_id, data, codec, contents)

    def _encode_granules(self, data: np.ndarray, codec: Codec) -> list[Any]:
        count = -(-data.nbytes // GRANULE)
        pieces: list[Any] = [codec.encode(data[i * GRANULE:(i + 1) * GRANULE]) for i in range(count - 1)]
        tail = data[(count - 1) * GRANULE:]
        if tail.nbytes < GRANULE:
            padded = np.zeros(GRANULE, dtype=np.uint8)
            padded[:tail.nbytes] = tail
            tail = padded
        pieces.append(codec.encode(tail))
        return pieces

    def _write_packed(self, data: np.ndarray, codec: Codec) -> Location:
        pieces = self._encode_granules(data, codec)
        if codec is not RAW and sum(len(p) for p in pieces) * MIN_RATIO > len(pieces) * GRANULE:
            codec = RAW
            pieces = self._encode_granules(data, RAW)
        return self._append(codec, pieces, tuple(len(p) for p in pieces))

    def copy_packed(self, loc: Location) -> Location:
        """Append a packed block's encoded chunks, as they are, to the active shard of its pack.

        For compaction: the bytes are not decoded or re-encoded; like :meth:`write`, the copy is
        durable only after :meth:`prepare` and the catalog commit.
        """
        path = self.files.shard_file(loc.array, loc.shard)
        fd = self.files.descriptors.acquire(path)
        try:
            data = os.pread(fd, loc.length, loc.offset)
        finally:
            self.files.descriptors.release(path, fd)
        if len(data) != loc.length:
            raise CorruptBlockError(f"{path} is truncated: {len(data)} of {loc.length} bytes at offset "
                                    f"{loc.offset}", path=path, tier="L3")
        starts = list(itertools.accumulate(loc.sizes, initial=0))
        view = memoryview(data)
        return self._append(codec_from_id(loc.codec), [view[a:b] for a, b in itertools.pairwise(starts)], loc.sizes)

    def _append(self, codec: Codec, pieces: list[Any], sizes: tuple[int, ...]) -> Location:
        shard = self._active_shard(codec, len(pieces))
        offset, first = shard.length, shard.slot
        written = write_all(shard.fd, pieces, offset)
        shard.index[shard.slot:shard.slot + len(sizes), 0] = list(itertools.accumulate(sizes[:-1], initial=offset))
        shard.index[shard.slot:shard.slot + len(sizes), 1] = sizes
        shard.slot += len(sizes)
        shard.length += written
        self._touched[(shard.array, shard.number)] = shard
        return Location(f"packs/{codec.id}", shard.number, offset, sizes, GRANULE, codec.id,
                        shard.number * PACK_SLOTS + first)

    def active_shards(self) -> set[tuple[str, int]]:
        """``(array, shard)`` of the pack shards being appended to (compaction and gc leave them alone)."""
        return {(s.array, s.number) for s in self._active.values()}

    def _active_shard(self, codec: Codec, slots: int) -> _Shard:
        array = f"packs/{codec.id}"
        shard = self._active.get(array)
        if shard is not None and shard.slot + slots <= PACK_SLOTS:
            return shard
        if shard is not None:  # full: nothing appends to it again
            del self._active[array]
            if (shard.array, shard.number) not in self._touched:  # commit/rollback close touched ones
                os.close(shard.fd)
        folder = self.files.root / array
        if not self.files.contained(folder):
            raise UnsafePathError(f"{folder} is a symbolic link or lies behind one, and tierstore never writes "
                                  "through links; run 'tierstore verify --fix' (it removes the link)",
                                  path=str(folder), tier="L3")
        number = self._next_shard.get(array, 0)
        self._next_shard[array] = number + 1
        if not (folder / "zarr.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            self._dirs_to_sync.update((folder, folder.parent))
        if self._pack_extent.get(array, 0) <= number:  # prepare() grows the shape: once per commit, not per shard
            self._grown[array] = codec
        path = folder / f"{number}{self.files.shard_suffix}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o644)
        index = np.full((PACK_SLOTS, 2), EMPTY_SLOT, dtype=np.uint64)
        shard = _Shard(array, number, path, fd, 0, 0, index, 0, 0, index.copy(), True)
        self._active[array] = shard
        self._dirs_to_sync.add(folder)
        return shard

    def write_now(self, block_id: int, data: np.ndarray, codec: Codec, contents: Contents | None = None) -> Location:
        """Write a block as an array of its own, synced at once, outside any pending batch.

        For a spill from a volatile tier in the middle of a transaction: the write neither joins
        nor disturbs the transaction's pending appends, and a rollback leaves it alone.
        """
        if data.nbytes == 0:
            return EMPTY_LOCATION
        loc = self._write_array(block_id, data, codec, contents, standalone=True)
        if self.files.fsync:
            fsync_dir(self.files.root / loc.array)
            fsync_dir(self.files.root / "blocks")
        return loc

    def _write_array(self, block_id: int, data: np.ndarray, codec: Codec, contents: Contents | None, *,
                     standalone: bool = False) -> Location:
        """A large block: appended to this commit's run of its codec and chunk size; a raw one, or
        (``standalone``, a spill, complete and synced when this returns) any, to an array of its own."""
        nbytes = data.nbytes
        count = -(-nbytes // ARRAY_CHUNK)
        per_chunk = -(-nbytes // count)
        inner = -(-per_chunk // GRANULE) * GRANULE
        probe: Any = None
        if codec is not RAW:
            probe = codec.encode(_chunk(data, 0, inner))
            if len(probe) * MIN_RATIO > inner:
                codec, probe = RAW, None  # the first chunk says compression will not pay
        # raw blocks keep a file each: weight streaming maps them, and a map of a block alone in its file
        # may skip its checksum when its pages are cached (l3_verify_maps="disk", .mapped.map_raw)
        if not standalone and codec is not RAW:
            run = self._run_for(block_id, codec, inner)
            start, first = run.offset, len(run.sizes)
            sizes, run.offset = self._write_chunks(run.fd, data, codec, inner, count, probe, run.offset)
            run.sizes.extend(sizes)
            run.blocks.append((first, nbytes, contents))
            return Location(run.array, 0, start, tuple(sizes), inner, codec.id, first)
        folder = self.files.root / "blocks" / f"{block_id:016x}"
        folder.mkdir()
        if not standalone:
            self._new_arrays.append(folder)
        path = folder / f"0{self.files.shard_suffix}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
        try:
            sizes, offset = self._write_chunks(fd, data, codec, inner, count, probe, 0)
            write_all(fd, [index_bytes(_index_of(sizes))], offset)
            if self.files.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        write_json(folder / "zarr.json", block_meta(nbytes, count * inner, inner, codec, contents),
                   sync=self.files.fsync)
        if not standalone:
            self._dirs_to_sync.update((folder, folder.parent))
        return Location(f"blocks/{block_id:016x}", 0, 0, tuple(sizes), inner, codec.id, 0)

    @staticmethod
    def _write_chunks(fd: int, data: np.ndarray, codec: Codec, inner: int, count: int, probe: Any,
                      offset: int) -> tuple[list[int], int]:
        """Encode ``data`` in ``count`` chunks of ``inner`` bytes and write them from ``offset``; returns their
        encoded sizes and the offset after them (``probe``: chunk 0 already encoded)."""
        sizes: list[int] = []
        for first in range(0, count, BATCH):  # bounded memory: at most a batch of encoded chunks
            indices = range(first, min(first + BATCH, count))
            if codec is RAW:
                pieces: list[Any] = [_chunk(data, i, inner) for i in indices]
            else:
                pieces = list(codec_pool().map(
                    lambda i: probe if i == 0 and probe is not None else codec.encode(_chunk(data, i, inner)), indices))
            offset += write_all(fd, pieces, offset)
            sizes.extend(len(p) for p in pieces)
        return sizes, offset

    def _run_for(self, block_id: int, codec: Codec, inner: int) -> _Run:
        """The run this commit appends large blocks of ``codec`` in ``inner`` chunks to (named by its first block)."""
        run = self._runs.get((codec.id, inner))
        if run is not None:
            return run
        folder = self.files.root / "blocks" / f"{block_id:016x}"
        folder.mkdir()
        self._new_arrays.append(folder)
        self._dirs_to_sync.update((folder, folder.parent))
        fd = os.open(folder / f"0{self.files.shard_suffix}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
        run = self._runs[(codec.id, inner)] = _Run(f"blocks/{block_id:016x}", folder, fd, codec, inner)
        return run

    def _finish_runs(self) -> None:
        """Each run's shard index after its chunks, synced, then its ``zarr.json`` (at :meth:`prepare`)."""
        for key, run in list(self._runs.items()):
            write_all(run.fd, [index_bytes(_index_of(run.sizes))], run.offset)
            if self.files.fsync:
                os.fdatasync(run.fd)
            os.close(run.fd)
            del self._runs[key]
            write_json(run.folder / "zarr.json", run_meta(run.inner, len(run.sizes), run.codec, run.blocks),
                       sync=self.files.fsync)

    def prepare(self) -> dict[tuple[str, int], int]:
        """Make everything written since the last commit durable; return the shard lengths to commit."""
        self._finish_runs()
        lengths: dict[tuple[str, int], int] = {}
        for array, codec in self._grown.items():  # a pack's shape covers the shards it has
            shards = 1 + max((n for a, n in self._touched if a == array), default=0)
            write_json(self.files.root / array / "zarr.json", pack_meta(codec, shards), sync=self.files.fsync)
            self._pack_extent[array] = shards
        self._grown.clear()
        for key, shard in self._touched.items():
            tail = index_bytes(shard.index)  # the shard stays a valid zarr shard after every commit
            write_all(shard.fd, [tail], shard.length)
            shard.length += len(tail)
            if self.files.fsync:
                os.fdatasync(shard.fd)
            lengths[key] = shard.length
        self.files.sync_dirs(self._dirs_to_sync)
        self._dirs_to_sync.clear()
        return lengths

    def commit(self) -> None:
        """The catalog committed what :meth:`prepare` returned: forget how to undo it."""
        for shard in self._touched.values():
            shard.committed_length = shard.length
            shard.committed_slot = shard.slot
            shard.committed_index = shard.index.copy()
            shard.created = False
            if self._active.get(shard.array) is not shard:
                os.close(shard.fd)
        self._touched.clear()
        self._new_arrays.clear()

    def rollback(self) -> None:
        """Undo every write since the last commit (the catalog did not commit them)."""
        for run in self._runs.values():
            os.close(run.fd)
        self._runs.clear()
        for shard in list(self._touched.values()):
            if shard.created:
                os.close(shard.fd)
                shard.path.unlink(missing_ok=True)
                self.files.descriptors.discard([str(shard.path)])
                if self._active.get(shard.array) is shard:
                    del self._active[shard.array]
                continue
            os.ftruncate(shard.fd, shard.committed_length)
            shard.length = shard.committed_length
            shard.slot = shard.committed_slot
            shard.index = shard.committed_index.copy()
            if self._active.get(shard.array) is not shard:
                os.close(shard.fd)
        self._touched.clear()
        self._grown.clear()  # the shards that grew a pack are gone
        for folder in self._new_arrays:
            shutil.rmtree(folder, ignore_errors=True)
        self._new_arrays.clear()
        self._dirs_to_sync.clear()

    def free(self, locations: Iterable[Location]) -> None:
        """Release committed blocks that no row points at any more (after the catalog commit)."""
        for loc in locations:
            if _BLOCK_ARRAY.fullmatch(loc.array):  # never a path a damaged catalog row made up
                self.files.descriptors.discard([self.files.shard_file(loc.array, 0)])
                if self.files.contained(self.files.root / loc.array):  # rmtree refuses a link itself, not one above
                    shutil.rmtree(self.files.root / loc.array, ignore_errors=True)
        # packed bytes stay as dead space in their shard until compaction rewrites it

    # -- metadata -------------------------------------------------------------------------------

    def restore_meta(self, loc: Location, nbytes: int, *, contents: Contents | None = None,
                     pack_shards: int = 1) -> None:
        """Write the ``zarr.json`` of the array holding ``loc`` again (it was lost, damaged or is layout 1).

        Only zarr readers need it (tierstore reads by the catalog's offsets); ``nbytes`` is the
        block's size, the shape of a large block's array; ``pack_shards`` how many shards a pack has.
        """
        codec = codec_from_id(loc.codec)
        if loc.array.startswith("packs/"):
            doc = pack_meta(codec, pack_shards)
            self._pack_extent[loc.array] = max(self._pack_extent.get(loc.array, 0), pack_shards)
        else:
            doc = block_meta(nbytes, len(loc.sizes) * loc.inner, loc.inner, codec, contents)
        target = self.files.root / loc.array / "zarr.json"
        if not self.files.contained(target):
            raise UnsafePathError(f"{target} is a symbolic link or lies behind one; tierstore never writes "
                                  "through links", path=str(target), tier="L3")
        write_json(target, doc, sync=self.files.fsync)

    def restore_run_meta(self, blocks: Sequence[tuple[Location, int, Contents]]) -> None:
        """Write the ``zarr.json`` of a large-block array (one block, or a commit's run) again from its live
        blocks ``(location, bytes, contents)``.

        The shard's chunk count is the index's at the file's end (dead blocks of the run count too): the
        smallest count from the live blocks' extent up whose index bytes hold their crc32c.
        """
        ordered = sorted(blocks, key=lambda b: b[0].chunk or 0)
        loc = ordered[0][0]
        extent = max((b[0].chunk or 0) + len(b[0].sizes) for b in ordered)
        path = self.files.shard_path(loc.array, 0)
        if not self.files.contained(path):
            raise UnsafePathError(f"{path} is a symbolic link or lies behind one; tierstore never writes "
                                  "through links", path=str(path), tier="L3")
        chunks = extent
        try:
            data = path.read_bytes()
            for count in range(extent, (len(data) - 4) // 16 + 1):
                if valid_index(data, len(data) - 16 * count - 4, count):
                    chunks = count
                    break
        except OSError:
            pass  # no file: the blocks are reported missing; the document still describes them
        codec = codec_from_id(loc.codec)
        doc = run_meta(loc.inner, chunks, codec, [(b[0].chunk or 0, b[1], b[2]) for b in ordered]) \
            if len(ordered) > 1 or (loc.chunk or 0) != 0 or chunks != len(loc.sizes) else \
            block_meta(ordered[0][1], len(loc.sizes) * loc.inner, loc.inner, codec, ordered[0][2])
        target = self.files.root / loc.array / "zarr.json"
        if not self.files.contained(target):
            raise UnsafePathError(f"{target} is a symbolic link or lies behind one; tierstore never writes "
                                  "through links", path=str(target), tier="L3")
        write_json(target, doc, sync=self.files.fsync)

    # -- lifecycle ------------------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether anything was written since the last commit or rollback."""
        return bool(self._touched or self._runs)

    def close(self) -> None:
        """Close the shard files appended to (roll back uncommitted appends first)."""
        if self.pending():
            self.rollback()
        for shard in self._active.values():
            try:
                os.close(shard.fd)
            except OSError:
                pass
        self._active.clear()
        self._touched.clear()
