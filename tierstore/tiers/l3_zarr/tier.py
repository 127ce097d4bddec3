"""The L3 tier as the engine sees it: one object over its files, writer, reader and repair.

:class:`ZarrL3` holds no logic of its own beyond wiring; each of its methods is one call into
the part that does the work (:mod:`.writer`, :mod:`.reader`, :mod:`.repair`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from ...fsguard import refuse_links
from ..codecs import Codec
from .files import L3Files
from .layout import LAYOUT, Contents, Location, RecoveryReport
from .mapped import map_raw, raw_extent
from .reader import L3Reader
from .repair import L3Repair
from .writer import L3Writer

__all__ = ["ZarrL3"]


class ZarrL3:
    """The L3 tier of one store. Reads are thread-safe; writes are not: the store serialises writers."""

    def __init__(self, store_dir: str | os.PathLike[str], *, fsync: bool = True, readonly: bool = False,
                 layout: int = LAYOUT) -> None:
        self.root = Path(store_dir) / "l3"
        refuse_links(Path(store_dir), ("l3", "l3/packs", "l3/blocks"), what="open the L3 tier")
        self.fsync = fsync
        self.readonly = readonly
        self.files = L3Files(self.root, fsync=fsync, layout=layout)
        self.writer = L3Writer(self.files)
        self.reader = L3Reader(self.files)
        self.repair = L3Repair(self.files, self.writer)
        if not readonly:
            self.files.ensure_group(self.root, {"tierstore": {"layout": layout}})
            self.files.ensure_group(self.root / "packs", {})
            self.files.ensure_group(self.root / "blocks", {})

    @property
    def layout(self) -> int:
        """1: shard files ``<n>`` (read, and written until :meth:`relink`); 2: ``<n>.0``, see the package."""
        return self.files.layout

    # -- names ----------------------------------------------------------------------------------

    def shard_path(self, array: str, shard: int) -> Path:
        """The file of ``shard`` in ``array``."""
        return self.files.shard_path(array, shard)

    def shard_number(self, name: str) -> int | None:
        """The shard a file name in an array folder stands for (None: not a shard file of this layout)."""
        return self.files.shard_number(name)

    # -- writing (see :class:`.writer.L3Writer`) ------------------------------------------------

    def write(self, block_id: int, data: np.ndarray, codec: Codec, contents: Contents | None = None) -> Location:
        """Write a block's bytes (flat uint8); durable only after :meth:`prepare` and the catalog commit.

        ``contents`` names what a large block's array holds (its attributes); packed blocks share an array.
        """
        return self.writer.write(block_id, data, codec, contents)

    def write_now(self, block_id: int, data: np.ndarray, codec: Codec, contents: Contents | None = None) -> Location:
        """Write a block as an array of its own, synced at once, outside any pending batch (a spill)."""
        return self.writer.write_now(block_id, data, codec, contents)

    def copy_packed(self, loc: Location) -> Location:
        """Append a packed block's encoded chunks, as they are, to the active shard of its pack (compaction)."""
        return self.writer.copy_packed(loc)

    def prepare(self) -> dict[tuple[str, int], int]:
        """Make everything written since the last commit durable; return the shard lengths to commit."""
        return self.writer.prepare()

    def commit(self) -> None:
        """The catalog committed what :meth:`prepare` returned: forget how to undo it."""
        self.writer.commit()

    def rollback(self) -> None:
        """Undo every write since the last commit (the catalog did not commit them)."""
        self.writer.rollback()

    def free(self, locations: Iterable[Location]) -> None:
        """Release committed blocks that no row points at any more (after the catalog commit)."""
        self.writer.free(locations)

    def remove_shards(self, shards: Iterable[tuple[str, int]]) -> int:
        """Delete shard files the catalog no longer knows (after its commit); returns the bytes freed."""
        return self.writer.remove_shards(shards)

    def start_shards_after(self, last: dict[str, int]) -> None:
        """Appends go to fresh shard numbers after those the catalog knows (one per pack)."""
        self.writer.start_shards_after(last)

    def active_shards(self) -> set[tuple[str, int]]:
        """``(array, shard)`` of the pack shards being appended to (compaction and gc leave them alone)."""
        return self.writer.active_shards()

    def restore_meta(self, loc: Location, nbytes: int, *, contents: Contents | None = None,
                     pack_shards: int = 1) -> None:
        """Write the ``zarr.json`` of the array holding ``loc`` again (it was lost, damaged or is layout 1)."""
        self.writer.restore_meta(loc, nbytes, contents=contents, pack_shards=pack_shards)

    def restore_run_meta(self, blocks: Sequence[tuple[Location, int, Contents]]) -> None:
        """Write the ``zarr.json`` of a large-block array again from its live ``(location, bytes, contents)``."""
        self.writer.restore_run_meta(blocks)

    # -- reading (see :class:`.reader.L3Reader`) ------------------------------------------------

    def read_into(self, loc: Location, out: np.ndarray) -> int:
        """Decode the block at ``loc`` into ``out`` (flat uint8 of the block's exact size); returns its crc32c.

        A large block's pieces are read ahead while earlier ones decode. Raises ``FileNotFoundError``
        when the shard file is gone (the caller decides whether the catalog moved on or the data is
        lost) and ``CorruptBlockError`` when bytes are damaged.
        """
        return self.reader.read_into(loc, out)

    def read_many(self, requests: Sequence[tuple[Location, np.ndarray]]) -> list[int | BaseException]:
        """Decode several blocks through one read-ahead pipeline; per request its crc32c or its error."""
        return self.reader.read_many(requests)

    def is_raw(self, loc: Location, nbytes: int) -> bool:
        """Whether the block at ``loc`` is stored raw and contiguous, so :meth:`map_raw` can view it."""
        return raw_extent(loc, nbytes) is not None

    def map_raw(self, loc: Location, nbytes: int, *,
                before_map: Callable[[bool], None] | None = None) -> np.ndarray | None:
        """A zero-copy view (flat uint8, ``MAP_PRIVATE``) of a raw block's bytes in its shard file; None if not
        mappable (see :mod:`.mapped`). Unchecked: the caller verifies the checksum. ``before_map`` hears,
        before the map, whether it will read nothing from the disk (:func:`.mapped.map_raw`).
        ``FileNotFoundError`` when the shard file is gone, ``CorruptBlockError`` when it is shorter than the block."""
        return map_raw(self.files, loc, nbytes, before_map=before_map)

    # -- recovery, index upkeep, layout upgrade (see :class:`.repair.L3Repair`) -----------------

    def recover(self, shard_lengths: dict[tuple[str, int], int], live_arrays: set[str]) -> RecoveryReport:
        """Bring the files in line with what the catalog committed (writer only, at open)."""
        return self.repair.recover(shard_lengths, live_arrays)

    def pack_shard_files(self) -> set[tuple[str, int]]:
        """``(array, number)`` of every pack shard file there is (names only: no stat per file)."""
        return self.repair.pack_shard_files()

    def shard_end(self, array: str, shard: int, extent: int) -> int | None:
        """How long a pack shard is by its bytes: the end of its first valid index after ``extent``."""
        return self.repair.shard_end(array, shard, extent)

    def index_problem(self, loc: Location, length: int, chunks: list[tuple[int, int]],
                      chunk_of: dict[tuple[int, int], int] | None = None) -> str | None:
        """What is wrong with the shard index zarr readers use (None: nothing)."""
        return self.repair.index_problem(loc, length, chunks, chunk_of)

    def write_index(self, loc: Location, length: int, chunks: list[tuple[int, int]],
                    chunk_of: dict[tuple[int, int], int] | None = None) -> None:
        """Write the shard index at the end of ``loc``'s shard again from the chunks of its live blocks."""
        self.repair.write_index(loc, length, chunks, chunk_of)

    def pack_slots(self, array: str, shard: int, length: int) -> dict[int, int]:
        """``{byte offset: slot}`` of the chunks in a pack shard, from the index its committed end holds."""
        return self.repair.pack_slots(array, shard, length)

    def relink(self, shards: Iterable[tuple[str, int]], blocks: Iterable[tuple[Location, int, Contents]]) -> None:
        """First step from layout 1 to 2: every shard file gets its layout-2 name too, every array new metadata."""
        self.repair.relink(shards, blocks)

    def drop_layout1_names(self, shards: Iterable[tuple[str, int]], arrays: Iterable[str]) -> None:
        """Last step to layout 2, after the catalog committed it: the old names go, this handle uses the new."""
        self.repair.drop_layout1_names(shards, arrays)

    def close(self) -> None:
        """Close open shard files (uncommitted appends are rolled back first)."""
        if not self.readonly:
            self.writer.close()
        self.files.descriptors.close()
