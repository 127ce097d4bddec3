"""Readers for the access traces in ``/work/shared/traces`` (see its README).

Every reader returns a :class:`Trace`: the keys as an ``int64`` numpy array in access order, plus,
for request-structured traces (Mooncake JSONL), the request each access belongs to, so that
prefix-aware scores and chain parents can be derived. Binary traces are decoded with
``np.frombuffer`` (never a Python loop): they run to millions of keys.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

__all__ = ["Trace", "FORMATS", "guess_format", "read_trace"]

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Trace:
    """Keys in access order; ``request`` (same length) is set only for request-structured traces."""

    keys: I64
    request: I64 | None = None
    note: str = ""


def _open_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    return raw


def _text(path: Path) -> IO[str]:
    return io.StringIO(_open_bytes(path).decode("utf-8", errors="replace"))


def _read_binary(dtype: str) -> Callable[[Path, int | None], Trace]:
    def read(path: Path, limit: int | None) -> Trace:
        data = _open_bytes(path)
        width = np.dtype(dtype).itemsize
        usable = len(data) - len(data) % width
        count = usable // width if limit is None else min(limit, usable // width)
        keys = np.frombuffer(data, dtype=dtype, count=count).astype(np.int64)
        return Trace(keys)
    return read


def _read_lines(path: Path, limit: int | None) -> Trace:
    """One integer a line; LIRS traces mark comments with a leading ``*``; other tokens are numbered."""
    values: list[int] = []
    names: dict[str, int] = {}
    for line in _text(path):
        text = line.strip()
        if not text or text.startswith("*") or text.startswith("#"):
            continue
        token = text.split()[0]
        try:
            values.append(int(token))
        except ValueError:  # a non-numeric key: number names in order of first sight, reproducibly
            values.append(-1 - names.setdefault(token, len(names)))
        if limit is not None and len(values) >= limit:
            break
    return Trace(np.asarray(values, dtype=np.int64))


def _read_mooncake(path: Path, limit: int | None) -> Trace:
    keys: list[int] = []
    request: list[int] = []
    for number, line in enumerate(_text(path)):
        if not line.strip():
            continue
        ids = json.loads(line).get("hash_ids", [])
        keys.extend(int(k) for k in ids)
        request.extend([number] * len(ids))
        if limit is not None and len(keys) >= limit:
            break
    stop = len(keys) if limit is None else min(limit, len(keys))
    return Trace(np.asarray(keys[:stop], dtype=np.int64), np.asarray(request[:stop], dtype=np.int64))


def _read_cloudphysics(path: Path, limit: int | None) -> Trace:
    reader = csv.reader(_text(path))
    header = next(reader, [])
    column = header.index("lbn") if "lbn" in header else 4
    keys: list[int] = []
    for row in reader:
        if len(row) > column:
            keys.append(int(row[column]))
            if limit is not None and len(keys) >= limit:
                break
    return Trace(np.asarray(keys, dtype=np.int64))


def _read_adaptsize(path: Path, limit: int | None) -> Trace:
    """``time id size`` lines; the key is the pair (id, size), packed into one int64."""
    ids: list[int] = []
    sizes: list[int] = []
    for line in _text(path):
        parts = line.split()
        if len(parts) >= 3:
            ids.append(int(parts[1]))
            sizes.append(int(parts[2]))
            if limit is not None and len(ids) >= limit:
                break
    pairs = np.stack([np.asarray(ids, dtype=np.int64), np.asarray(sizes, dtype=np.int64)], axis=1)
    _, keys = np.unique(pairs, axis=0, return_inverse=True)
    return Trace(keys.reshape(-1).astype(np.int64))


def _read_azure(path: Path, limit: int | None) -> Trace:
    """Azure LLM traces carry no block keys; synthesise one private KV chain per request.

    Each request gets ``ceil(ContextTokens / 512)`` fresh block keys. Nothing is shared between
    requests, so every policy scores 0: the file is good for arrival times and footprints only.
    """
    keys: list[int] = []
    request: list[int] = []
    next_key = 0
    reader = csv.DictReader(_text(path))
    for number, row in enumerate(reader):
        blocks = max(1, -(-int(row["ContextTokens"]) // 512))
        keys.extend(range(next_key, next_key + blocks))
        request.extend([number] * blocks)
        next_key += blocks
        if limit is not None and len(keys) >= limit:
            break
    stop = len(keys) if limit is None else min(limit, len(keys))
    note = "Azure trace has no block keys: synthetic per-request KV chains, no reuse possible"
    return Trace(np.asarray(keys[:stop], dtype=np.int64), np.asarray(request[:stop], dtype=np.int64), note)


FORMATS: dict[str, Callable[[Path, int | None], Trace]] = {
    "mooncake": _read_mooncake,
    "azure": _read_azure,
    "cloudphysics": _read_cloudphysics,
    "int32": _read_binary(">i4"),
    "int64": _read_binary(">i8"),
    "adaptsize": _read_adaptsize,
    "lirs": _read_lines,
    "text": _read_lines,
}

_INT64_NAMES = ("scarab", "vaultservice")
_INT32_NAMES = ("orm-", "web07", "wikipedia", "cache2k")


def guess_format(path: Path) -> str:
    """The format name for ``path``, from its file name as the traces README lays them out."""
    name = path.name.lower()
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return "mooncake"
    if name.startswith("azurellm") or ("azure" in name and name.endswith(".csv")):
        return "azure"
    if name.endswith(".csv"):
        return "cloudphysics"
    if any(part in name for part in _INT64_NAMES):
        return "int64"
    if any(part in name for part in _INT32_NAMES):
        return "int32"
    if name.startswith("request"):
        return "adaptsize"
    return "lirs" if ".trace" in name else "text"


def read_trace(path: Path, fmt: str | None = None, limit: int | None = None) -> Trace:
    """Read ``path`` in ``fmt`` (guessed from the name when None), stopping after ``limit`` keys."""
    name = fmt or guess_format(path)
    if name not in FORMATS:
        raise SystemExit(f"unknown trace format {name!r}; choose one of {', '.join(FORMATS)}")
    trace = FORMATS[name](path, limit)
    if limit is not None and len(trace.keys) > limit:
        request = None if trace.request is None else trace.request[:limit]
        return Trace(trace.keys[:limit], request, trace.note)
    return trace
