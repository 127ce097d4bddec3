"""L3: the durable tier, a compressed Zarr v3 hierarchy on the local disk.

Layout under ``<store>/l3`` (every folder is a zarr v3 group or array, so
zarr-python and tensorstore read it as is)::

    zarr.json                       group
    packs/<codec>/zarr.json         one uint8 array per codec for small blocks
    packs/<codec>/<n>.0             shard n: 4 KiB inner chunks, appended to in place
    blocks/<block id>/zarr.json     one uint8 array per large block
    blocks/<block id>/0.0           its single shard: ~1 MiB inner chunks

Every array is 2-D, ``(elements, element size)`` bytes, so that byte-grouped
codecs are the spec's ``transpose`` (see :mod:`.l3_codecs`). A pack's shape
covers the shards it has; each 4 KiB granule is one inner chunk, and a packed
block is the run of chunks from its ``Location.chunk``. A large block's array
is exactly the block; its attributes name its key, dtype and shape.
Layout 1 (stores written before) had 1-D arrays, shard files ``<n>``, a pack
shape of 2^50 bytes and ``numcodecs.shuffle``; :meth:`ZarrL3.relink` turns
one into layout 2 without rewriting any chunk (the bytes are the same).

Everything is a *sharded* array so that one file holds many independently
compressed chunks and an index at its end (zarr's ``sharding_indexed``).
Small blocks are appended to the active shard of their codec's pack: an
append writes the new chunks, then (at ``prepare``) a fresh index after them,
so the file stays a valid shard after every commit and a torn append is cut
off on recovery by truncating to the length the catalog committed.

File names come from block ids and shard numbers, never from keys. This
module knows nothing of the catalog: the store tells it what is committed.
Zarr's own I/O is not on the hot path (it costs a metadata file per array and
milliseconds per call); reads are one ``pread`` of contiguous chunks.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.chunk_key_encodings import V2ChunkKeyEncoding
from zarr.core.dtype import UInt8
from zarr.core.metadata.v3 import ArrayV3Metadata

from ..errors import CorruptBlockError, UnsafePathError, translate_os_error
from ..fsguard import NOFOLLOW, contained, refuse_links
from .codecs import MIN_RATIO, RAW, Codec, codec_from_id
from .open_files import OpenFiles

__all__ = ["GRANULE", "PACK_SLOTS", "PACK_MAX", "OPEN_FILES", "PACK_INDEX_BYTES", "LAYOUT", "EMPTY_LOCATION",
           "Contents", "Location", "RecoveryReport", "ZarrL3"]

LAYOUT = 2
"""The L3 layout this code writes (the catalog's ``store_meta`` says which one a store has)."""

GRANULE = 4096
"""Inner chunk of a pack: small blocks take whole granules."""
PACK_SLOTS = 64
"""Inner chunks per pack shard (a 1 KiB index per append)."""
PACK_MAX = GRANULE * PACK_SLOTS
"""Blocks up to this many bytes are packed; larger ones get an array of their own."""
PACK_INDEX_BYTES = PACK_SLOTS * 16 + 4
"""The shard index written after every append to a pack (offset and size per slot, then its crc32c)."""
ARRAY_CHUNK = 1 << 20
"""Target inner chunk of a large block: big enough to compress well, small enough to decode in parallel."""
_BATCH = 64
"""Chunks encoded, written or read at a time for a large block: bounds the memory beside the block."""
OPEN_FILES = 64
"""Read descriptors one tier keeps open, shared by its threads (least recently used closed first).

Shard files are append-only and never reuse a name, so a kept descriptor never goes stale; one is
closed as soon as its file is deleted (compaction, gc, a freed large block) and no read uses it.
"""
_EMPTY = np.uint64(2**64 - 1)
_BLOCK_ARRAY = re.compile(r"blocks/[0-9a-f]{16}")


L3Columns = tuple[str, str | None, int | None, int | None, bytes | None, int | None, int, int | None]
"""A :class:`Location` as the catalog keeps it: ``(codec, array, shard, offset, sizes, inner, stored bytes,
chunk)``.

The catalog stores the tuple without reading it (``BlockRow.l3_columns``); only L3 knows what it means.
"""


@dataclass(frozen=True, slots=True)
class Location:
    """Where a block's encoded bytes are: contiguous chunks in one shard file."""

    array: str
    """``packs/<codec>`` or ``blocks/<id>``; empty for a zero-byte block (nothing stored)."""
    shard: int
    offset: int
    sizes: tuple[int, ...]
    """Encoded size of each inner chunk, in file order."""
    inner: int
    """Decoded size of one inner chunk."""
    codec: str
    chunk: int | None = None
    """Index of the block's first inner chunk along axis 0 of ``array`` (0 for a large block); None when
    not known (a block of a layout-1 store whose shard index could not be read at the upgrade)."""

    @property
    def length(self) -> int:
        """Encoded bytes on disk."""
        return sum(self.sizes)

    def sizes_blob(self) -> bytes:
        """``sizes`` packed for the catalog."""
        return np.asarray(self.sizes, dtype="<u4").tobytes()

    @staticmethod
    def sizes_from_blob(blob: bytes) -> tuple[int, ...]:
        """Inverse of :meth:`sizes_blob`."""
        return tuple(int(x) for x in np.frombuffer(blob, dtype="<u4"))

    def to_columns(self) -> L3Columns:
        """``(codec, array, shard, offset, sizes, inner, stored bytes, chunk)`` as the catalog keeps them (opaque
        to it)."""
        return (self.codec, self.array or None, self.shard, self.offset, self.sizes_blob(), self.inner, self.length,
                self.chunk)

    @staticmethod
    def from_columns(columns: L3Columns) -> Location:
        """Inverse of :meth:`to_columns` (an empty location for a block with no bytes in L3)."""
        codec, array, shard, offset, sizes, inner, _stored, chunk = columns
        if array is None or sizes is None:
            return Location("", 0, 0, (), 0, codec)
        return Location(array, shard or 0, offset or 0, Location.sizes_from_blob(sizes), inner or 0, codec, chunk)


EMPTY_LOCATION = Location("", 0, 0, (), GRANULE, "raw")


@dataclass(frozen=True, slots=True)
class Contents:
    """What a large block's array holds, for its attributes (zarr readers see no catalog)."""

    key: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(slots=True)
class RecoveryReport:
    """What :meth:`ZarrL3.recover` found and did."""

    removed_files: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    """Symbolic links found in L3: left alone (never followed, never removed); ``tierstore verify --fix``
    removes the links themselves and drops the blocks whose bytes they stand for."""
    rebuilt: list[str] = field(default_factory=list)
    """Shard rows the catalog lost or shortened, rebuilt from the bytes (their files were kept)."""
    catalog_rollback: str = ""
    """Non-empty when the catalog lost commits it had acknowledged (a damaged WAL): what was lost."""


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


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                           thread_name_prefix="tierstore-codec")
    return _POOL


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _write_json(path: Path, doc: dict[str, Any], *, sync: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    # O_NOFOLLOW: a planted zarr.json.tmp link must not have this written into its target;
    # the rename then replaces a link at ``path`` itself, never what it points at.
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o644), "w",
                   encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.flush()
        if sync:
            os.fdatasync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _array_meta(nbytes: int, shard: int, inner: int, codec: Codec, attributes: dict[str, Any]) -> dict[str, Any]:
    """The ``zarr.json`` of a 2-D ``(elements, element size)`` uint8 array of ``nbytes`` bytes.

    ``shard`` and ``inner`` are in bytes; zarr's own metadata classes build and check the document.
    """
    return {**_geometry_meta(nbytes, shard, inner, codec), "attributes": {"tierstore": attributes}}


@functools.lru_cache(maxsize=256)
def _geometry_meta(nbytes: int, shard: int, inner: int, codec: Codec) -> dict[str, Any]:
    # Cached: zarr's validation costs ~0.2-0.5 ms a document, a fifth of a 300 KiB block's put, and
    # a model's blocks come in few sizes. Attributes are plain JSON that zarr passes through as given.
    size = codec.elementsize
    meta = ArrayV3Metadata(
        shape=(nbytes // size, size), data_type=UInt8(),
        chunk_grid={"name": "regular", "configuration": {"chunk_shape": [shard // size, size]}},
        chunk_key_encoding=V2ChunkKeyEncoding(separator="."), fill_value=0,
        codecs=[ShardingCodec(chunk_shape=(inner // size, size), codecs=codec.zarr_codecs(),
                              index_codecs=[BytesCodec(), Crc32cCodec()], index_location="end")],
        attributes={}, dimension_names=("element", "byte"), storage_transformers=())
    return meta.to_dict()


def _pack_meta(codec: Codec, shards: int) -> dict[str, Any]:
    return _array_meta(max(shards, 1) * PACK_MAX, PACK_MAX, GRANULE, codec, {
        "kind": "pack", "codec": codec.id, "granule": GRANULE,
        "blocks": "many small blocks; the catalog's blocks table (l3_array, l3_chunk) says which chunks hold each"})


def _block_meta(nbytes: int, shard: int, inner: int, codec: Codec, contents: Contents | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {"kind": "block", "codec": codec.id}
    if contents is not None:
        attributes.update(key=contents.key, dtype=contents.dtype, shape=list(contents.shape))
    return _array_meta(nbytes, shard, inner, codec, attributes)


def _write_all(fd: int, pieces: list[Any], offset: int) -> int:
    """``pwritev`` every byte of ``pieces`` at ``offset``; returns the byte count.

    A short write (a full disk, a file size limit) is finished piece by piece, so the failure
    surfaces as the ``OSError`` with its real errno (``ENOSPC``, ``EFBIG``), which callers turn
    into ``StoreFullError``, instead of a write that silently stopped early.
    """
    total = sum(len(memoryview(p).cast("B")) for p in pieces)
    written = os.pwritev(fd, pieces, offset)
    if written < total:  # rare: copy the rest once and keep writing until the OS says why it stops
        rest = memoryview(b"".join(bytes(p) for p in pieces))[written:]
        while rest:
            n = os.pwrite(fd, rest, offset + written)
            if n <= 0:
                raise OSError(errno.ENOSPC, "no progress writing", str(fd))
            written += n
            rest = rest[n:]
    return written


def _index_bytes(index: np.ndarray) -> bytes:
    raw = index.astype("<u8", copy=False).tobytes()
    return raw + crc32c.crc32c(raw).to_bytes(4, "little")


class ZarrL3:
    """The L3 tier of one store. Not thread-safe for writes: the store serialises writers."""

    def __init__(self, store_dir: str | os.PathLike[str], *, fsync: bool = True, readonly: bool = False,
                 layout: int = LAYOUT) -> None:
        self.root = Path(store_dir) / "l3"
        self._root = str(self.root)
        refuse_links(Path(store_dir), ("l3", "l3/packs", "l3/blocks"), what="open the L3 tier")
        self._files = OpenFiles(OPEN_FILES, self._open_read)
        self.fsync = fsync
        self.readonly = readonly
        self.layout = layout
        """1: shard files ``<n>`` (read, and written until :meth:`relink`); 2: ``<n>.0``, see the module."""
        self._shard_suffix = ".0" if layout >= 2 else ""
        self._pack_extent: dict[str, int] = {}
        """Shards each pack's ``zarr.json`` covers, as this handle last wrote it."""
        self._grown: dict[str, Codec] = {}
        """Packs that started a shard past their extent since :meth:`prepare` last wrote their ``zarr.json``."""
        self._next_shard: dict[str, int] = {}
        self._active: dict[str, _Shard] = {}
        self._touched: dict[tuple[str, int], _Shard] = {}
        self._new_arrays: list[Path] = []
        self._dirs_to_sync: set[Path] = set()
        if not readonly:
            self._ensure_group(self.root, {"tierstore": {"layout": layout}})
            self._ensure_group(self.root / "packs", {})
            self._ensure_group(self.root / "blocks", {})

    # -- layout ---------------------------------------------------------------------------------

    def _ensure_group(self, path: Path, attributes: dict[str, Any]) -> None:
        meta = path / "zarr.json"
        if not meta.exists():
            path.mkdir(parents=True, exist_ok=True)
            _write_json(meta, {"zarr_format": 3, "node_type": "group", "attributes": attributes},
                        sync=self.fsync)
            if self.fsync:
                _fsync_dir(path)
                _fsync_dir(path.parent)

    def shard_path(self, array: str, shard: int) -> Path:
        """The file of ``shard`` in ``array``."""
        return self.root / array / f"{shard}{self._shard_suffix}"

    def _shard_file(self, array: str, shard: int) -> str:
        return f"{self._root}/{array}/{shard}{self._shard_suffix}"

    def shard_number(self, name: str) -> int | None:
        """The shard a file name in an array folder stands for (None: not a shard file of this layout)."""
        if self._shard_suffix:
            if not name.endswith(self._shard_suffix):
                return None
            name = name[:-len(self._shard_suffix)]
        return int(name) if name.isascii() and name.isdigit() else None

    def _open_read(self, path: str) -> int:
        """Open a file of this tier for reading; never through a link (see :mod:`tierstore.fsguard`)."""
        if not contained(self._root, path):
            raise UnsafePathError(f"{path} is a symbolic link or lies behind one, and tierstore never follows "
                                  "links inside a store; run 'tierstore verify --fix' (it removes the link)",
                                  path=path, tier="L3")
        try:
            fd = os.open(path, os.O_RDONLY | NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise translate_os_error(exc, what="read L3", path=path) from None
            raise
        # Packed neighbours are read soon after one another: one readahead instead of a
        # disk read per small block (cold small gets ~40% faster here).
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return fd

    def remove_shards(self, shards: Iterable[tuple[str, int]]) -> int:
        """Delete shard files the catalog no longer knows (after its commit); returns the bytes freed.

        Their read descriptors are closed at once, or by the last read still using one, so the
        disk space comes back now rather than when the store closes.
        """
        freed = 0
        paths = []
        for array, number in shards:
            path = self.shard_path(array, number)
            if not contained(self._root, path):
                continue  # a link, or behind one: not the store's file (verify reports it)
            try:
                freed += path.lstat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            paths.append(str(path))
        self._files.discard(paths)
        if paths and self.fsync:
            for folder in {Path(p).parent for p in paths}:
                _fsync_dir(folder)
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
        path = self._shard_file(loc.array, loc.shard)
        fd = self._files.acquire(path)
        try:
            data = os.pread(fd, loc.length, loc.offset)
        finally:
            self._files.release(path, fd)
        if len(data) != loc.length:
            raise CorruptBlockError(f"{path} is truncated: {len(data)} of {loc.length} bytes at offset "
                                    f"{loc.offset}", path=path, tier="L3")
        starts = list(itertools.accumulate(loc.sizes, initial=0))
        view = memoryview(data)
        return self._append(codec_from_id(loc.codec), [view[a:b] for a, b in itertools.pairwise(starts)], loc.sizes)

    def _append(self, codec: Codec, pieces: list[Any], sizes: tuple[int, ...]) -> Location:
        shard = self._active_shard(codec, len(pieces))
        offset, first = shard.length, shard.slot
        written = _write_all(shard.fd, pieces, offset)
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
        folder = self.root / array
        if not contained(self._root, folder):
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
        path = folder / f"{number}{self._shard_suffix}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o644)
        index = np.full((PACK_SLOTS, 2), _EMPTY, dtype=np.uint64)
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
        if self.fsync:
            _fsync_dir(self.root / loc.array)
            _fsync_dir(self.root / "blocks")
        return loc

    def _write_array(self, block_id: int, data: np.ndarray, codec: Codec, contents: Contents | None, *,
                     standalone: bool = False) -> Location:
        nbytes = data.nbytes
        count = -(-nbytes // ARRAY_CHUNK)
        per_chunk = -(-nbytes // count)
        inner = -(-per_chunk // GRANULE) * GRANULE

        def chunk(i: int) -> np.ndarray:
            piece = data[i * inner:(i + 1) * inner]
            if piece.nbytes < inner:  # zarr decodes every inner chunk to full size: pad the last one
                padded = np.zeros(inner, dtype=np.uint8)
                padded[:piece.nbytes] = piece
                piece = padded
            return piece

        probe: Any = None
        if codec is not RAW:
            probe = codec.encode(chunk(0))
            if len(probe) * MIN_RATIO > inner:
                codec, probe = RAW, None  # the first chunk says compression will not pay
        folder = self.root / "blocks" / f"{block_id:016x}"
        folder.mkdir()
        if not standalone:
            self._new_arrays.append(folder)
        path = folder / f"0{self._shard_suffix}"
        sizes: list[int] = []
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
        try:
            offset = 0
            for first in range(0, count, _BATCH):  # bounded memory: at most a batch of encoded chunks
                indices = range(first, min(first + _BATCH, count))
                if codec is RAW:
                    pieces: list[Any] = [chunk(i) for i in indices]
                else:
                    pieces = list(_pool().map(lambda i: probe if i == 0 else codec.encode(chunk(i)), indices))
                written = _write_all(fd, pieces, offset)
                sizes.extend(len(p) for p in pieces)
                offset += written
            index = np.empty((count, 2), dtype=np.uint64)
            index[:, 1] = sizes
            index[:, 0] = np.concatenate(([0], np.cumsum(sizes[:-1], dtype=np.int64)))
            _write_all(fd, [_index_bytes(index)], offset)
            if self.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        _write_json(folder / "zarr.json", _block_meta(nbytes, count * inner, inner, codec, contents), sync=self.fsync)
        if not standalone:
            self._dirs_to_sync.update((folder, folder.parent))
        return Location(f"blocks/{block_id:016x}", 0, 0, tuple(sizes), inner, codec.id, 0)

    def prepare(self) -> dict[tuple[str, int], int]:
        """Make everything written since the last commit durable; return the shard lengths to commit."""
        lengths: dict[tuple[str, int], int] = {}
        for array, codec in self._grown.items():  # a pack's shape covers the shards it has
            shards = 1 + max((n for a, n in self._touched if a == array), default=0)
            _write_json(self.root / array / "zarr.json", _pack_meta(codec, shards), sync=self.fsync)
            self._pack_extent[array] = shards
        self._grown.clear()
        for key, shard in self._touched.items():
            tail = _index_bytes(shard.index)  # the shard stays a valid zarr shard after every commit
            _write_all(shard.fd, [tail], shard.length)
            shard.length += len(tail)
            if self.fsync:
                os.fdatasync(shard.fd)
            lengths[key] = shard.length
        if self.fsync:
            for folder in sorted(self._dirs_to_sync, key=lambda p: len(p.parts), reverse=True):
                _fsync_dir(folder)
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
        for shard in list(self._touched.values()):
            if shard.created:
                os.close(shard.fd)
                shard.path.unlink(missing_ok=True)
                self._files.discard([str(shard.path)])
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
                self._files.discard([self._shard_file(loc.array, 0)])
                if contained(self._root, self.root / loc.array):  # rmtree refuses a link itself, not one above
                    shutil.rmtree(self.root / loc.array, ignore_errors=True)
        # packed bytes stay as dead space in their shard until compaction rewrites it

    # -- reading --------------------------------------------------------------------------------

    def read_into(self, loc: Location, out: np.ndarray) -> None:
        """Decode the block at ``loc`` into ``out`` (flat uint8 of the block's exact size).

        Raises ``FileNotFoundError`` when the shard file is gone (the caller decides whether the
        catalog moved on or the data is lost) and ``CorruptBlockError`` when bytes are damaged.
        """
        if not loc.sizes:
            return
        path = self._shard_file(loc.array, loc.shard)
        fd = self._files.acquire(path)
        try:
            if len(loc.sizes) <= _BATCH:
                self._read_chunks(fd, path, loc, 0, len(loc.sizes), loc.offset, out)
                return
            offset = loc.offset
            for first in range(0, len(loc.sizes), _BATCH):  # bounded memory for huge blocks
                last = min(first + _BATCH, len(loc.sizes))
                self._read_chunks(fd, path, loc, first, last, offset, out)
                offset += sum(loc.sizes[first:last])
        finally:
            self._files.release(path, fd)

    def _read_chunks(self, fd: int, path: str, loc: Location, first: int, last: int, offset: int,
                     out: np.ndarray) -> None:
        length = sum(loc.sizes[first:last])
        lo, hi = first * loc.inner, min(last * loc.inner, out.nbytes)
        if loc.codec == "raw":  # no decoding: read straight into the output
            buffers: list[Any] = [out[lo:hi]]
            if last * loc.inner > hi:
                buffers.append(bytearray(last * loc.inner - hi))
            got = os.preadv(fd, buffers, offset)
        else:
            data = os.pread(fd, length, offset)
            got = len(data)
        if got != length:
            raise CorruptBlockError(f"{path} is truncated: {got} of {length} bytes at offset {offset}",
                                    path=path, tier="L3")
        if loc.codec != "raw":
            sub = Location(loc.array, loc.shard, offset, loc.sizes[first:last], loc.inner, loc.codec)
            self._decode(sub, memoryview(data), out[lo:hi], path)

    def _decode(self, loc: Location, data: memoryview, out: np.ndarray, path: str) -> None:
        try:
            codec = codec_from_id(loc.codec)
        except ValueError as exc:
            raise CorruptBlockError(f"{path}: {exc}", path=path, tier="L3") from None
        inner, nbytes = loc.inner, out.nbytes
        if len(loc.sizes) == 1:  # the common small block: one granule, no bookkeeping
            try:
                if nbytes == inner:
                    codec.decode_into(data, out)
                else:
                    scratch = np.empty(inner, dtype=np.uint8)
                    codec.decode_into(data, scratch)
                    out[:] = scratch[:nbytes]
            except (RuntimeError, ValueError, TypeError) as exc:
                raise CorruptBlockError(f"{path}: chunk does not decode ({exc})", path=path, tier="L3") from None
            return
        starts = list(itertools.accumulate(loc.sizes[:-1], initial=0))

        def one(i: int) -> None:
            piece = data[starts[i]:starts[i] + loc.sizes[i]]
            lo = i * inner
            if lo + inner <= nbytes:
                codec.decode_into(piece, out[lo:lo + inner])
            else:
                scratch = np.empty(inner, dtype=np.uint8)
                codec.decode_into(piece, scratch)
                out[lo:] = scratch[:nbytes - lo]

        try:
            if len(loc.sizes) > 2 and loc.codec != "raw":
                list(_pool().map(one, range(len(loc.sizes))))
            else:
                for i in range(len(loc.sizes)):
                    one(i)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise CorruptBlockError(f"{path}: chunk does not decode ({exc})", path=path, tier="L3") from None

    def restore_meta(self, loc: Location, nbytes: int, *, contents: Contents | None = None,
                     pack_shards: int = 1) -> None:
        """Write the ``zarr.json`` of the array holding ``loc`` again (it was lost, damaged or is layout 1).

        Only zarr readers need it (tierstore reads by the catalog's offsets); ``nbytes`` is the
        block's size, the shape of a large block's array; ``pack_shards`` how many shards a pack has.
        """
        codec = codec_from_id(loc.codec)
        if loc.array.startswith("packs/"):
            doc = _pack_meta(codec, pack_shards)
            self._pack_extent[loc.array] = max(self._pack_extent.get(loc.array, 0), pack_shards)
        else:
            doc = _block_meta(nbytes, len(loc.sizes) * loc.inner, loc.inner, codec, contents)
        target = self.root / loc.array / "zarr.json"
        if not contained(self._root, target):
            raise UnsafePathError(f"{target} is a symbolic link or lies behind one; tierstore never writes "
                                  "through links", path=str(target), tier="L3")
        _write_json(target, doc, sync=self.fsync)

    # -- layout upgrade ---------------------------------------------------------------------------

    def pack_slots(self, array: str, shard: int, length: int) -> dict[int, int]:
        """``{byte offset: slot}`` of the chunks in a pack shard, from the index its committed end holds.

        Empty when the index is unreadable (short or failing its crc32c): then its blocks' chunks are
        unknown, which costs zarr readers their address and tierstore nothing (it reads by offset).
        """
        path = self._shard_file(array, shard)
        try:
            fd = self._files.acquire(path)
        except (OSError, UnsafePathError):
            return {}
        try:
            raw = os.pread(fd, PACK_INDEX_BYTES, length - PACK_INDEX_BYTES) if length >= PACK_INDEX_BYTES else b""
        finally:
            self._files.release(path, fd)
        if len(raw) != PACK_INDEX_BYTES or crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            return {}
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(PACK_SLOTS, 2)
        return {int(offset): slot for slot, (offset, _) in enumerate(index) if offset != _EMPTY}

    def relink(self, shards: Iterable[tuple[str, int]], blocks: Iterable[tuple[Location, int, Contents]]) -> None:
        """First step from layout 1 to 2: every shard file gets its layout-2 name too, every array new metadata.

        Hard links, so no byte is copied and the layout-1 names keep working for whoever reads by them
        until :meth:`drop_layout1_names`, after the catalog committed the new layout. Idempotent: a crash
        in between leaves layout 1 whole, and the next open runs this again.
        """
        extents: dict[str, int] = {}
        folders: set[Path] = set()
        for array, number in shards:
            self._link(self.root / array / str(number), self.root / array / f"{number}.0")
            extents[array] = max(extents.get(array, 0), number + 1)
            folders.add(self.root / array)
        codec_ids = {a: a.removeprefix("packs/") for a in extents}
        for array, count in extents.items():
            self.restore_meta(Location(array, 0, 0, (), GRANULE, codec_ids[array]), 0, pack_shards=count)
        for loc, nbytes, contents in blocks:
            self._link(self.root / loc.array / "0", self.root / loc.array / "0.0")
            self.restore_meta(loc, nbytes, contents=contents)
            folders.add(self.root / loc.array)
        if self.fsync:
            for folder in folders:
                _fsync_dir(folder)

    def _link(self, old: Path, new: Path) -> None:
        if not contained(self._root, old):
            return  # a link, or behind one: never followed (recovery reported it)
        try:
            os.link(old, new, follow_symlinks=False)
        except FileExistsError:
            pass  # a relink a crash interrupted got this far
        except FileNotFoundError:
            pass  # missing since before: recovery reported it

    def drop_layout1_names(self, shards: Iterable[tuple[str, int]], arrays: Iterable[str]) -> None:
        """Last step to layout 2, after the catalog committed it: the old names go, this handle uses the new."""
        names = [self.root / a / str(n) for a, n in shards] + [self.root / a / "0" for a in arrays]
        self._files.discard([str(p) for p in names])  # reads reopen by the new names
        for path in names:
            if contained(self._root, path):
                path.unlink(missing_ok=True)
        self.layout, self._shard_suffix = 2, ".0"
        _write_json(self.root / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                              "attributes": {"tierstore": {"layout": 2}}}, sync=self.fsync)
        if self.fsync:
            for folder in {p.parent for p in names} | {self.root}:
                _fsync_dir(folder)

    # -- recovery -------------------------------------------------------------------------------

    def pack_shard_files(self) -> set[tuple[str, int]]:
        """``(array, number)`` of every pack shard file there is (names only: no stat per file)."""
        packs = self.root / "packs"
        found: set[tuple[str, int]] = set()
        for folder in (p for p in packs.iterdir() if p.is_dir()) if packs.is_dir() else []:
            numbers = (self.shard_number(name) for name in os.listdir(folder))
            found.update((f"packs/{folder.name}", n) for n in numbers if n is not None)
        return found

    def shard_end(self, array: str, shard: int, extent: int) -> int | None:
        """How long a pack shard is by its bytes: the end of its first valid index after ``extent``.

        ``extent`` is where the last committed block in it ends; the index of that block's commit
        follows it unless later (since deleted) appends did. Without a valid index there, the
        whole file counts (nothing a block may need is ever cut). None when the file is gone.
        """
        try:
            data = self.shard_path(array, shard).read_bytes()
        except FileNotFoundError:
            return None
        for start in range(max(extent, 0), len(data) - PACK_INDEX_BYTES + 1):
            if _valid_index(data, start, PACK_SLOTS):
                return start + PACK_INDEX_BYTES
        return len(data)

    def index_problem(self, loc: Location, length: int, chunks: list[tuple[int, int]],
                      chunk_of: dict[tuple[int, int], int] | None = None) -> str | None:
        """What is wrong with the shard index zarr readers use (None: nothing).

        ``length`` is the committed length of the shard file, ``chunks`` the ``(offset, size)``
        of every chunk a live block has in it. tierstore reads by the catalog's offsets, so a bad
        index only misleads zarr readers; :meth:`write_index` writes it again.
        """
        slots = PACK_SLOTS if loc.array.startswith("packs/") else len(loc.sizes)
        size = slots * 16 + 4
        path = self.shard_path(loc.array, loc.shard)
        try:
            with open(path, "rb") as fh:
                fh.seek(max(length - size, 0))
                data = fh.read(size)
        except FileNotFoundError:
            return None  # the block check reports the missing file
        if len(data) != size or not _valid_index(data, 0, slots, end=length - size):
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
        slots = PACK_SLOTS if packed else len(loc.sizes)
        first = loc.shard * PACK_SLOTS if packed else 0
        known = {c: n - first for c, n in (chunk_of or {}).items() if 0 <= n - first < slots}
        size = slots * 16 + 4
        path = self.shard_path(loc.array, loc.shard)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            old = np.frombuffer(os.pread(fd, size - 4, length - size), dtype="<u8").reshape(-1, 2)
            index = _rebuilt_index(old, slots, sorted(set(chunks)), known)
            _write_all(fd, [_index_bytes(index)], length - size)
            if self.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)

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
        packs = self.root / "packs"
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
                    if (linked := self.shard_number(entry.name)) is not None:  # listed once, as a link
                        seen.add((array, linked))
                    continue
                if entry.name == "zarr.json":
                    continue
                found = self.shard_number(entry.name)
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
        report.missing.extend(f"{self.shard_path(a, n)}" for a, n in shard_lengths if (a, n) not in seen)
        blocks = self.root / "blocks"
        present: set[str] = set()
        for entry in blocks.iterdir() if blocks.exists() else []:
            name = f"blocks/{entry.name}"
            shard = entry / f"0{self._shard_suffix}"
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
                if self._shard_suffix and old.is_file() and not old.is_symlink():  # left by an upgrade cut short
                    old.unlink()
                    report.removed_files.append(str(old))
        report.missing.extend(str(self.root / a) for a in sorted(live_arrays - present))
        if self.fsync and (report.removed_files or report.truncated):
            _fsync_dir(self.root)
        return report

    def close(self) -> None:
        """Close open shard files (uncommitted appends are rolled back first)."""
        if self._touched and not self.readonly:
            self.rollback()
        for shard in self._active.values():
            try:
                os.close(shard.fd)
            except OSError:
                pass
        self._active.clear()
        self._touched.clear()
        self._files.close()


def _valid_index(data: bytes, start: int, slots: int, *, end: int | None = None) -> bool:
    """Whether ``data[start:]`` begins with a shard index whose crc32c holds and whose chunks end before it."""
    body = data[start:start + slots * 16]
    crc = data[start + slots * 16:start + slots * 16 + 4]
    if len(crc) != 4 or crc32c.crc32c(body) != int.from_bytes(crc, "little"):
        return False
    pairs = np.frombuffer(body, dtype="<u8").reshape(-1, 2)
    used = pairs[pairs[:, 0] != _EMPTY]
    limit = start if end is None else end
    return bool(len(used) == 0 or int((used[:, 0] + used[:, 1]).max()) <= limit)


def _rebuilt_index(old: np.ndarray, slots: int, chunks: list[tuple[int, int]],
                   known: dict[tuple[int, int], int] | None = None) -> np.ndarray:
    index = np.full((slots, 2), _EMPTY, dtype=np.uint64)
    wanted = set(chunks)
    placed: set[tuple[int, int]] = set()
    for chunk, slot in (known or {}).items():
        if chunk in wanted and index[slot, 0] == _EMPTY:
            index[slot] = chunk
            placed.add(chunk)
    for slot, (offset, size) in enumerate(old.tolist()[:slots]):
        if index[slot, 0] != _EMPTY:
            continue
        if (offset, size) in wanted and (offset, size) not in placed:
            index[slot] = (offset, size)
            placed.add((offset, size))
    free = [s for s in range(slots) if index[s, 0] == _EMPTY]
    for offset, size in (c for c in chunks if c not in placed):
        before = [s for s in range(slots) if index[s, 0] != _EMPTY and int(index[s, 0]) < offset]
        after = [s for s in range(slots) if index[s, 0] != _EMPTY and int(index[s, 0]) > offset]
        lo, hi = (max(before) if before else -1), (min(after) if after else slots)
        gap = [s for s in free if lo < s < hi]
        if gap:
            index[gap[0]] = (offset, size)
            free.remove(gap[0])
    return index


def chunk_count(nbytes: int) -> int:
    """How many inner chunks a block of ``nbytes`` takes (for stats and planning)."""
    if nbytes <= PACK_MAX:
        return -(-nbytes // GRANULE)
    return math.ceil(nbytes / ARRAY_CHUNK)
