"""The files of one L3 tier: their names, the folders that hold them, and the descriptors reads share.

File names come from block ids and shard numbers, never from keys. Nothing is opened or written
through a symbolic link (see :mod:`tierstore.fsguard`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ...errors import UnsafePathError, translate_os_error
from ...fsguard import NOFOLLOW, contained
from ..open_files import OpenFiles
from .layout import OPEN_FILES
from .metadata import fsync_dir, group_meta, write_json

__all__ = ["L3Files"]


class L3Files:
    """Names and shared read descriptors of the files under ``<store>/l3`` (thread-safe for reads)."""

    def __init__(self, root: Path, *, fsync: bool, layout: int) -> None:
        self.root = root
        self.root_text = str(root)
        self.fsync = fsync
        self.layout = layout
        """1: shard files ``<n>``; 2: ``<n>.0`` (see :mod:`tierstore.tiers.l3_zarr`)."""
        self.shard_suffix = ".0" if layout >= 2 else ""
        self.packs_prefix = f"{self.root_text}/packs/"
        """Where the pack shards are (small blocks side by side), as the start of their paths."""
        self.descriptors = OpenFiles(OPEN_FILES, self._open_read)

    def use_layout(self, layout: int) -> None:
        """Name shard files as ``layout`` does from now on (after an upgrade dropped the old names)."""
        self.layout, self.shard_suffix = layout, ".0" if layout >= 2 else ""

    def shard_path(self, array: str, shard: int) -> Path:
        """The file of ``shard`` in ``array``."""
        return self.root / array / f"{shard}{self.shard_suffix}"

    def shard_file(self, array: str, shard: int) -> str:
        """:meth:`shard_path` as a string (the key of its read descriptor)."""
        return f"{self.root_text}/{array}/{shard}{self.shard_suffix}"

    def shard_number(self, name: str) -> int | None:
        """The shard a file name in an array folder stands for (None: not a shard file of this layout)."""
        if self.shard_suffix:
            if not name.endswith(self.shard_suffix):
                return None
            name = name[:-len(self.shard_suffix)]
        return int(name) if name.isascii() and name.isdigit() else None

    def contained(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` lies inside this tier with no symbolic link on the way."""
        return contained(self.root_text, path)

    def ensure_group(self, path: Path, attributes: dict[str, Any]) -> None:
        """Create the zarr group at ``path`` unless it has its ``zarr.json``."""
        meta = path / "zarr.json"
        if not meta.exists():
            path.mkdir(parents=True, exist_ok=True)
            write_json(meta, group_meta(attributes), sync=self.fsync)
            if self.fsync:
                fsync_dir(path)
                fsync_dir(path.parent)

    def sync_dirs(self, folders: Iterable[Path]) -> None:
        """``fsync`` the folders (when this tier syncs), deepest first."""
        if self.fsync:
            for folder in sorted(set(folders), key=lambda p: len(p.parts), reverse=True):
                fsync_dir(folder)

    def _open_read(self, path: str) -> int:
        """Open a file of this tier for reading; never through a link (see :mod:`tierstore.fsguard`)."""
        if not contained(self.root_text, path):
            raise UnsafePathError(f"{path} is a symbolic link or lies behind one, and tierstore never follows "
                                  "links inside a store; run 'tierstore verify --fix' (it removes the link)",
                                  path=path, tier="L3")
        try:
            fd = os.open(path, os.O_RDONLY | NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise translate_os_error(exc, what="read L3", path=path) from None
            raise
        if path.startswith(self.packs_prefix):
            # Packed neighbours are read soon after one another: one readahead instead of a
            # disk read per small block (cold small gets ~40% faster here). Not for a large
            # block's own file: its pieces are read in order and the kernel's readahead paces
            # them, while a WILLNEED of the whole file made the opening thread allocate and queue
            # all of it before the first piece (cold reads of raw 16 MiB blocks 0.83-0.95x ->
            # 1.02-1.39x safetensors, compressed no worse; BENCHMARKS.md, L3 cold reads).
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return fd
