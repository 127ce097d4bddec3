"""Never following a symbolic link out of a store.

Stores come in tarballs and from other users, so any entry of one may be a
link to somewhere else; a write, truncate or delete through it would change a
file that is not the store's. The rules, kept by every module that touches
store files:

- files are opened with ``O_NOFOLLOW`` (:func:`open_nofollow`): a link as the
  last component fails with ``ELOOP``, which :func:`tierstore.errors.translate_os_error`
  turns into :class:`~tierstore.errors.UnsafePathError`;
- before a delete, truncate or write of an entry found by walking a folder,
  :func:`contained` checks that the entry is no link and that every folder
  above it, up to the store root, is a real folder inside the store;
- the fixed entries of a store (:data:`STORE_FILES`, :data:`STORE_FOLDERS`)
  are checked at open (:func:`refuse_links`): a link among them refuses the
  open with ``UnsafePathError`` before anything is touched. Links deeper in
  L3 (a pack folder, a shard file, a block folder) are left as they are and
  reported (``TierStore.recovery.links``, ``tierstore verify``).

The store root itself may be a link: the user chose where the store lives.
The checks are not atomic against a concurrent attacker renaming folders
under an open store; they are against hostile content already on disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import UnsafePathError

__all__ = ["NOFOLLOW", "STORE_FILES", "STORE_FOLDERS", "open_nofollow", "contained", "links_among",
           "refuse_links"]

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
STORE_FILES = ("LOCK", "catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm", "catalog.sqlite-journal",
               "catalog.sqlite-headroom", "l2.slab", "l2.index", "l2.index.tmp", "l3/zarr.json",
               "l3/packs/zarr.json", "l3/blocks/zarr.json")
"""Files at fixed places in a store, relative to its root."""
STORE_FOLDERS = ("l3", "l3/packs", "l3/blocks")
CATALOG_ENTRIES = ("catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm", "catalog.sqlite-journal")
"""What a read-only open touches besides L3 (SQLite may write its -shm even then)."""


def open_nofollow(path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a link as the last component (``OSError`` with ``ELOOP``)."""
    return os.open(path, flags | NOFOLLOW, mode)


def contained(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is no link and lies in real folders under ``root`` (no ``..``, no link on the way)."""
    rel = os.path.relpath(path, root)
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return False
    if os.path.islink(path):
        return False
    folder = os.path.dirname(rel)
    want = os.path.normpath(os.path.join(os.path.realpath(root), folder))
    return os.path.realpath(os.path.join(root, folder)) == want


def links_among(store_dir: Path, names: Iterable[str]) -> list[str]:
    """The entries of ``names`` (relative to ``store_dir``) that are symbolic links."""
    return [name for name in names if (store_dir / name).is_symlink()]


def refuse_links(store_dir: Path, names: Iterable[str], *, what: str) -> None:
    """Raise ``UnsafePathError`` for the first link among the fixed entries ``names``."""
    links = links_among(store_dir, names)
    if links:
        target = os.readlink(store_dir / links[0])
        raise UnsafePathError(
            f"{what}: {store_dir / links[0]} is a symbolic link (to {target}), and tierstore never follows "
            f"links inside a store ({len(links)} such entr{'y' if len(links) == 1 else 'ies'}: "
            f"{', '.join(links)}); replace each with the real file or folder, or remove it",
            path=str(store_dir / links[0]))
