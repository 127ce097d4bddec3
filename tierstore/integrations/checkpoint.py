"""Model checkpoints in and out of a store: safetensors files read and written tensor by tensor.

:func:`import_checkpoint` reads a Hugging Face checkpoint folder (``config.json`` and one or more
``*.safetensors`` shards, with or without ``model.safetensors.index.json``) or a single
``.safetensors`` file, and puts every tensor in the store under ``prefix + name``, in one
transaction: a failed import leaves the store as it was. The safetensors header is parsed here and
each tensor is read with one ``readinto`` into a buffer of its own size, so an import never holds
more than the largest tensor (plus the store's bounded compression buffers), whatever the model size.

The checkpoint's small files (``config.json``, ``generation_config.json``) and the safetensors
``__metadata__`` go in the store too, as ``uint8`` blocks under the reserved key prefix
``prefix + "__hf__/"`` (no tensor name in a checkpoint starts with ``__``); :func:`read_json`
reads them back.

:func:`export_safetensors` writes the tensors under a prefix back to one safetensors file, again one
tensor at a time. Tensors are laid out in safetensors' own order (by dtype, widest first, then by
name) with its header encoding, so exporting an import of a single file written by
``safetensors.torch.save_file`` (or ``save_pretrained``) gives back the same file, byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import BlockNotFoundError, CheckpointError
from ..store import TierStore

__all__ = ["HF_META", "CONFIG_FILES", "TensorEntry", "read_header", "checkpoint_files", "import_checkpoint",
           "export_safetensors", "read_json", "stored_tensor_keys"]

HF_META = "__hf__/"
"""Reserved key prefix (after the model prefix) for the checkpoint's non-tensor files."""
CONFIG_FILES = ("config.json", "generation_config.json")
"""The small files of a checkpoint folder kept in the store beside the tensors."""
ST_METADATA = "safetensors_metadata.json"
"""The safetensors ``__metadata__`` of the imported files (merged), kept for export."""
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 << 20
"""Largest header accepted, as safetensors itself does (a guard against garbage lengths)."""

# safetensors dtype names, in the order of its Dtype enum (export sorts by it, widest first).
_ST_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
             "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
_ST_TORCH = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
             "F8_E8M0": "float8_e8m0fnu", "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
             "I32": "int32", "U32": "uint32", "F32": "float32", "C64": "complex64", "F64": "float64",
             "I64": "int64", "U64": "uint64"}
_TO_TORCH: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _ST_TORCH.items() if hasattr(torch, v)}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}
_RANK = {name: i for i, name in enumerate(_ST_ORDER)}


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are and what they are."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Offset of the first byte in the file (header included)."""
    nbytes: int


def read_header(path: str | Path) -> tuple[list[TensorEntry], dict[str, str]]:
    """The tensors of safetensors file ``path`` (in file order) and its ``__metadata__``.

    Raises ``CheckpointError`` for anything that is not a well-formed safetensors file: a short
    file, a header length past the end, header bytes that are not a JSON object, an unknown dtype,
    or offsets that disagree with the shape or run past the end of the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file", path=str(path))
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: header length {length} is past the end of the {size}-byte file "
                                      "(not a safetensors file, or truncated)", path=str(path))
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}", path=str(path)) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: the safetensors header is not JSON ({exc})", path=str(path)) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object", path=str(path))
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings", path=str(path))
    base = 8 + length
    entries = [_entry(path, name, spec, base, size) for name, spec in header.items()]
    entries.sort(key=lambda e: e.start)
    return entries, metadata


def _entry(path: Path, name: str, spec: Any, base: int, size: int) -> TensorEntry:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {why}", path=str(path), key=name)

    if not isinstance(spec, dict):
        raise bad("its header entry is not an object")
    dtype = _TO_TORCH.get(spec.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise bad(f"dtype {spec.get('dtype')!r} is not one tierstore reads")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative ints")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r} are not [begin, end]")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes but {dtype} {shape} needs {nbytes}")
    if base + offsets[1] > size:
        raise bad(f"its bytes end at {base + offsets[1]}, past the end of the {size}-byte file (truncated?)")
    return TensorEntry(name, dtype, tuple(shape), base + offsets[0], nbytes)


def checkpoint_files(checkpoint: str | Path, *, require_config: bool = False) -> list[Path]:
    """The safetensors files of a checkpoint: the file itself, the index's shards, or every ``*.safetensors``.

    ``require_config`` wants a Hugging Face model folder (with ``config.json``). Raises
    ``CheckpointError`` when there is nothing to import.
    """
    path = Path(checkpoint)
    if require_config and not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a Hugging Face model folder (no config.json)", path=str(path))
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: neither a folder nor a .safetensors file", path=str(path))
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc!r})", path=str(index)) from None
        files = [path / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {path}: {missing}", path=str(path))
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors file (tierstore reads safetensors checkpoints only; "
                              "convert .bin/.pt weights with transformers' save_pretrained first)", path=str(path))
    return files


@contextmanager
def _progress_bar(enabled: bool, description: str, total: int) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from ..progress import BytesColumn, SpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), BytesColumn(), SpeedColumn(),
                  TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def import_checkpoint(checkpoint: str | Path, store: TierStore, *, prefix: str = "", require_config: bool = False,
                      progress: bool = False) -> int:
    """Put every tensor of ``checkpoint`` (a folder or one ``.safetensors`` file) in ``store``.

    Tensors go under ``prefix + name``; ``config.json`` and ``generation_config.json`` (when the
    folder has them) and the safetensors metadata under ``prefix + "__hf__/"``. Everything is one
    transaction: it all lands, or (on any error) nothing does. ``require_config`` refuses a folder
    without ``config.json`` (what ``tierstore import-hf`` wants); ``progress`` shows a progress bar.
    Returns the number of tensors imported.
    """
    files = checkpoint_files(checkpoint, require_config=require_config)
    folder = Path(checkpoint) if Path(checkpoint).is_dir() else None
    headers = [(f, *read_header(f)) for f in files]  # validate every header before writing anything
    seen: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for f, entries, meta in headers:
        metadata.update(meta)
        for e in entries:
            if e.name in seen:
                raise CheckpointError(f"tensor {e.name!r} is in both {seen[e.name].name} and {f.name}",
                                      path=str(f), key=e.name)
            if e.name.startswith(HF_META):
                raise CheckpointError(f"{f}: tensor name {e.name!r} uses tierstore's reserved prefix {HF_META!r}",
                                      path=str(f), key=e.name)
            seen[e.name] = f
    total = sum(e.nbytes for _, entries, _ in headers for e in entries)
    count = 0
    with _progress_bar(progress, f"importing {len(seen)} tensors", total) as advance, store.transaction():
        for f, entries, _ in headers:
            with _open_shard(f) as stream:
                for e in entries:
                    store.put(prefix + e.name, _read_tensor(stream, f, e))
                    count += 1
                    if advance is not None:
                        advance(e.nbytes)
        for name in CONFIG_FILES:
            if folder is not None and (folder / name).is_file():
                _put_bytes(store, prefix + HF_META + name, (folder / name).read_bytes())
        _put_bytes(store, prefix + HF_META + ST_METADATA, json.dumps(metadata).encode())  # in the source order
    return count


def _open_shard(path: Path) -> BinaryIO:
    try:
        return open(path, "rb", buffering=0)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}", path=str(path)) from None


def _read_tensor(stream: BinaryIO, path: Path, e: TensorEntry) -> torch.Tensor:
    buf = bytearray(e.nbytes)
    stream.seek(e.start)
    got = stream.readinto(buf)  # type: ignore[attr-defined]
    if got != e.nbytes:
        raise CheckpointError(f"{path}: tensor {e.name!r} is cut short ({got} of {e.nbytes} bytes)",
                              path=str(path), key=e.name)
    if e.nbytes == 0:
        return torch.empty(e.shape, dtype=e.dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(e.dtype).view(e.shape)


def _put_bytes(store: TierStore, key: str, data: bytes) -> None:
    store.put(key, torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8))


def read_json(store: TierStore, name: str, *, prefix: str = "") -> Any:
    """A JSON file kept by :func:`import_checkpoint` (``"config.json"``, ...); None if it was not imported."""
    key = prefix + HF_META + name
    try:
        data = store.get(key, copy=True)
    except BlockNotFoundError:
        return None
    try:
        return json.loads(data.numpy().tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"block {key!r} is not the JSON file it should be ({exc})", key=key) from None


def stored_tensor_keys(store: TierStore, prefix: str = "") -> list[str]:
    """The keys of the model tensors under ``prefix`` (not the reserved ``__hf__/`` blocks of any model)."""
    return [k for k in store.keys(prefix=prefix or None) if HF_META not in k]


def export_safetensors(store: TierStore, out: str | Path, *, prefix: str = "", progress: bool = False) -> int:
    """Write the tensors under ``prefix`` to the safetensors file ``out`` (names without the prefix).

    The file is written next to ``out`` and renamed into place when complete. Returns the number of
    tensors written. Raises ``CheckpointError`` when there is nothing under ``prefix`` or a dtype has
    no safetensors name.
    """
    out = Path(out)
    keys = stored_tensor_keys(store, prefix)
    if not keys:
        raise CheckpointError(f"no tensors under prefix {prefix!r} in {store.path}", path=str(store.path))
    infos = [(key[len(prefix):], key, store.info(key)) for key in keys]
    for _, key, info in infos:
        if info.dtype not in _FROM_TORCH:
            raise CheckpointError(f"block {key!r} is {info.dtype}, which safetensors cannot hold", key=key)
    infos.sort(key=lambda t: (-_RANK[_FROM_TORCH[t[2].dtype]], t[0]))
    metadata = read_json(store, ST_METADATA, prefix=prefix)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, _, info in infos:
        header[name] = {"dtype": _FROM_TORCH[info.dtype], "shape": list(info.shape),
                        "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    tmp = out.with_name(out.name + ".partial")
    try:
        with _progress_bar(progress, f"exporting {len(infos)} tensors", offset) as advance, open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for _, key, info in infos:
                if info.nbytes:
                    f.write(store.get(key).reshape(-1).view(torch.uint8).numpy().data)
                if advance is not None:
                    advance(info.nbytes)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {out}: {exc.strerror or exc}", path=str(out)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(infos)
