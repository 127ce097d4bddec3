"""Model checkpoints in and out of a store: safetensors files read and written tensor by tensor.

:func:`import_checkpoint` reads a Hugging Face checkpoint folder (``config.json`` and one or more
``*.safetensors`` shards, with or without ``model.safetensors.index.json``) or a single
``.safetensors`` file, and puts every tensor in the store under ``prefix + name``, in one
transaction: a failed import leaves the store as it was. Files are read by the safetensors library
itself (``safe_open``), so tierstore accepts exactly the files safetensors accepts (it refuses
overlapping or aliased tensors, holes, trailing bytes, non-integer dimensions, ...) and reads every
dtype it reads. Tensors are taken one at a time with ``get_tensor`` and handed to the store before
the next is read, so an import never holds more than the largest tensor (plus the store's bounded
compression buffers), whatever the model size.

The checkpoint's small files (``config.json``, ``generation_config.json``) and the safetensors
``__metadata__`` go in the store too, as ``uint8`` blocks under the reserved key prefix
``prefix + "__hf__/"`` (no tensor name in a checkpoint starts with ``__``); :func:`read_json`
reads them back.

:func:`export_safetensors` writes the tensors under a prefix back to one safetensors file, again one
tensor at a time. Tensors are laid out in safetensors' own order (by dtype, widest first, then by
name) with its header encoding, so exporting an import of a single file written by
``safetensors.torch.save_file`` (or ``save_pretrained``) gives back the same file, byte for byte.
(:mod:`.hf_export` writes a whole Hugging Face model folder instead.)
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
from typing import Any

import torch

from ..engine.handle import TierStore
from ..engine.values import BlockInfo
from ..errors import BlockNotFoundError, CheckpointError

__all__ = ["HF_META", "CONFIG_FILES", "TensorEntry", "read_header", "checkpoint_files", "import_checkpoint",
           "export_safetensors", "read_json", "stored_tensor_keys", "safetensors_dtype", "progress_bar"]

HF_META = "__hf__/"
"""Reserved key prefix (after the model prefix) for the checkpoint's non-tensor files."""
CONFIG_FILES = ("config.json", "generation_config.json")
"""The small files of a checkpoint folder kept in the store beside the tensors."""
ST_METADATA = "safetensors_metadata.json"
"""The safetensors ``__metadata__`` of the imported files (merged), kept for export."""
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names, in the order of its Dtype enum (export sorts by it, widest first; the
# order is what safetensors 0.8's save_file produces).
_ST_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
             "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
_ST_TORCH = {"BOOL": "bool", "F4": "float4_e2m1fn_x2", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
             "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz",
             "F8_E5M2FNUZ": "float8_e5m2fnuz", "I16": "int16", "U16": "uint16", "F16": "float16",
             "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "C64": "complex64",
             "F64": "float64", "I64": "int64", "U64": "uint64"}
_TO_TORCH: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _ST_TORCH.items() if hasattr(torch, v)}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}
_RANK = {name: i for i, name in enumerate(_ST_ORDER)}
_PACKED = {"F4": 2}
"""safetensors dtypes whose torch dtype packs several elements per item (F4: float4_e2m1fn_x2, two a byte).
safetensors counts elements in the shape, torch counts items: the last dimension differs by this factor."""


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a safetensors file, as torch will hold it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    """The torch shape (for F4, the last dimension counts packed pairs, as ``get_tensor`` returns it)."""
    nbytes: int


def safetensors_dtype(dtype: torch.dtype) -> str | None:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``); None if it has none."""
    return _FROM_TORCH.get(dtype)


def _safe_open(path: Path) -> Any:
    """``safe_open(path)`` with its refusals as ``CheckpointError``: the one choke point for the library."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt")
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: safetensors refuses this file ({exc}); it is not a well-formed "
                              "safetensors file (re-save it with safetensors.torch.save_file)",
                              path=str(path)) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}", path=str(path)) from None


def read_header(path: str | Path) -> tuple[list[TensorEntry], dict[str, str]]:
    """The tensors of safetensors file ``path`` (in file order) and its ``__metadata__``.

    The safetensors library validates the file, so ``CheckpointError`` comes for exactly the files it
    refuses (a short file, a bad header, overlapping or aliased tensors, holes, trailing bytes,
    offsets that disagree with the shape, ...), and also for a dtype this torch has no type for.
    """
    path = Path(path)
    with _safe_open(path) as f:
        metadata = f.metadata() or {}
        entries = []
        for name in f.offset_keys():
            view = f.get_slice(name)
            st_dtype, shape = view.get_dtype(), tuple(view.get_shape())
            dtype = _TO_TORCH.get(st_dtype)
            if dtype is None:
                wanted = _ST_TORCH.get(st_dtype)
                why = (f"needs torch.{wanted}, which torch {torch.__version__} lacks (upgrade torch)" if wanted
                       else "has no torch dtype")
                raise CheckpointError(f"{path}: tensor {name!r} is {st_dtype}, which {why}", path=str(path), key=name)
            if st_dtype in _PACKED and shape:
                shape = (*shape[:-1], shape[-1] // _PACKED[st_dtype])
            entries.append(TensorEntry(name, dtype, shape, math.prod(shape) * dtype.itemsize))
    return entries, _in_file_order(path, metadata)


def _in_file_order(path: Path, metadata: dict[str, str]) -> dict[str, str]:
    """``metadata`` (as safetensors read it) in the order of the file's header.

    safetensors hands ``__metadata__`` back in hash order; the file's own order is what lets an
    export reproduce the file byte for byte. The header was validated by safetensors already, so
    only the key order is taken from it.
    """
    if not metadata:
        return {}
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        order = json.loads(f.read(length)).get("__metadata__", {})
    return {k: metadata[k] for k in order if k in metadata} | metadata


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
def progress_bar(enabled: bool, description: str, total: int) -> Iterator[Any]:
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
    with progress_bar(progress, f"importing {len(seen)} tensors", total) as advance, store.transaction():
        for f, entries, _ in headers:
            for e in entries:
                # One mapping per tensor: safe_open maps the whole shard, and every page a read touches
                # stays in this process's RSS until the mapping closes, so a shard held open for all
                # its tensors would grow RSS by the shard's size (1 GiB shards: +1 GiB at import).
                with _safe_open(f) as shard:
                    tensor = _read_tensor(shard, f, e)
                store.put(prefix + e.name, tensor)
                del tensor
                count += 1
                if advance is not None:
                    advance(e.nbytes)
        for name in CONFIG_FILES:
            if folder is not None and (folder / name).is_file():
                _put_bytes(store, prefix + HF_META + name, (folder / name).read_bytes())
        _put_bytes(store, prefix + HF_META + ST_METADATA, json.dumps(metadata).encode())  # in the source order
    return count


def _read_tensor(shard: Any, path: Path, e: TensorEntry) -> torch.Tensor:
    """Tensor ``e`` of the open ``shard``, checked against the header validated before the import began."""
    from safetensors import SafetensorError

    try:
        tensor: torch.Tensor = shard.get_tensor(e.name)
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: cannot read tensor {e.name!r} ({exc})", path=str(path), key=e.name) from None
    if tensor.dtype != e.dtype or tuple(tensor.shape) != e.shape:
        raise CheckpointError(f"{path}: tensor {e.name!r} is now {tensor.dtype} {list(tensor.shape)}, not the "
                              f"{e.dtype} {list(e.shape)} its header said: was the file rewritten during the import?",
                              path=str(path), key=e.name)
    return tensor


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


def _file_shape(st_dtype: str, shape: tuple[int, ...]) -> list[int]:
    """The shape safetensors writes for a torch shape (it counts F4 elements, torch counts packed pairs)."""
    factor = _PACKED.get(st_dtype, 1)
    return [*shape[:-1], shape[-1] * factor] if shape and factor != 1 else list(shape)


def stored_tensor_keys(store: TierStore, prefix: str = "") -> list[str]:
    """The keys of the model tensors under ``prefix`` (not the reserved ``__hf__/`` blocks of any model)."""
    return [k for k in store.keys(prefix=prefix or None) if HF_META not in k]


_EXPORT_BATCH = 256 << 20
"""Bytes of tensors :func:`export_safetensors` reads with one ``get_many`` (memory beside the file: one batch)."""


def _batches(infos: list[tuple[str, str, BlockInfo]]) -> Iterator[list[tuple[str, str, BlockInfo]]]:
    """``infos`` in order, cut into runs of at most :data:`_EXPORT_BATCH` bytes (a larger tensor alone)."""
    batch: list[tuple[str, str, BlockInfo]] = []
    size = 0
    for item in infos:
        if batch and size + item[2].nbytes > _EXPORT_BATCH:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item[2].nbytes
    if batch:
        yield batch


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
        if info.dtype not in _FROM_TORCH or (_FROM_TORCH[info.dtype] in _PACKED and not info.shape):
            raise CheckpointError(f"block {key!r} is {info.dtype} {list(info.shape)}, which safetensors cannot hold",
                                  key=key)
    infos.sort(key=lambda t: (-_RANK[_FROM_TORCH[t[2].dtype]], t[0]))
    metadata = read_json(store, ST_METADATA, prefix=prefix)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, _, info in infos:
        header[name] = {"dtype": _FROM_TORCH[info.dtype], "shape": _file_shape(_FROM_TORCH[info.dtype], info.shape),
                        "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    tmp = out.with_name(out.name + ".partial")
    try:
        with progress_bar(progress, f"exporting {len(infos)} tensors", offset) as advance, open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for batch in _batches(infos):  # a bounded number of bytes read ahead together (get_many)
                got = store.get_many([key for _, key, info in batch if info.nbytes])
                for _, key, info in batch:
                    if info.nbytes:
                        f.write(got.pop(key).reshape(-1).view(torch.uint8).numpy().data)
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
