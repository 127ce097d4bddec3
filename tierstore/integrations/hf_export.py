"""A model in a store written back out as a Hugging Face model folder that ``from_pretrained`` loads.

:func:`export_hf` writes ``config.json`` and ``generation_config.json`` (the bytes kept by
:func:`~.checkpoint.import_checkpoint` under ``__hf__/``), the model's tensors as safetensors shards
written by the safetensors library, and, when there is more than one shard,
``model.safetensors.index.json`` with its ``metadata`` (``total_size``, ``total_parameters``) and
``weight_map`` - the layout ``save_pretrained`` writes, shards split by huggingface_hub's own
splitter in the model's ``state_dict`` order. Only the model's own tensors go out: its parameters
and persistent buffers, found from the model class the config names (built empty, no memory), so KV
cache blocks, vision features or another model's tensors under the same prefix stay behind; a tied
weight the store does not hold is left for ``from_pretrained`` to tie again.

The folder is written beside ``out`` and renamed into place when complete. One shard's tensors are
held in memory while it is written: ``max_shard_size`` bounds the export's memory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..config import parse_size
from ..engine.handle import TierStore
from ..errors import BlockNotFoundError, CheckpointError, ConfigError
from .checkpoint import CONFIG_FILES, HF_META, INDEX_FILE, ST_METADATA, progress_bar, read_json, safetensors_dtype
from .hf_model import build_empty_model, stored_config, tied_weights

__all__ = ["export_hf", "DEFAULT_MAX_SHARD_SIZE"]

DEFAULT_MAX_SHARD_SIZE = "2GB"
"""Smaller than ``save_pretrained``'s 50GB: a shard is held in memory while it is written."""


def _model_keys(store: TierStore, prefix: str, model: Any) -> list[str]:
    """The names of the model's tensors to write, in ``state_dict`` order; ``CheckpointError`` if some are missing."""
    present = set(store.keys(prefix=prefix or None))
    tied = tied_weights(model)
    names, missing = [], []
    for name in model.state_dict(keep_vars=True):
        if prefix + name in present:
            names.append(name)
        elif name not in tied:
            missing.append(name)
    if missing:
        raise CheckpointError(f"the store lacks {len(missing)} tensors of the {type(model).__name__} under prefix "
                              f"{prefix!r}: {missing[:5]}{' ...' if len(missing) > 5 else ''}", path=str(store.path))
    return names


def _read_stored(store: TierStore, key: str) -> bytes | None:
    try:
        return bytes(store.get(key, copy=True).numpy().tobytes())
    except BlockNotFoundError:
        return None


def _write_folder(store: TierStore, folder: Path, prefix: str, names: list[str], model: Any, limit: int,
                  progress: bool) -> None:
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file

    infos = {name: store.info(prefix + name) for name in names}
    for name, info in infos.items():
        if safetensors_dtype(info.dtype) is None:
            raise CheckpointError(f"block {prefix + name!r} is {info.dtype}, which safetensors cannot hold",
                                  key=prefix + name)
    split = split_state_dict_into_shards_factory(infos, get_storage_size=lambda info: info.nbytes,
                                                 filename_pattern="model{suffix}.safetensors", max_shard_size=limit)
    metadata = read_json(store, ST_METADATA, prefix=prefix) or {}
    metadata = {"format": "pt", **metadata}  # from_pretrained wants a framework in every shard
    total = sum(info.nbytes for info in infos.values())
    with progress_bar(progress, f"exporting {len(names)} tensors", total) as advance:
        for filename, shard_names in split.filename_to_tensors.items():
            got = store.get_many([prefix + name for name in shard_names], copy=True)  # one read-ahead pass
            tensors = {name: got[prefix + name] for name in shard_names}
            del got
            save_file(tensors, folder / filename, metadata=metadata)
            del tensors  # before the next shard is read: memory stays at one shard
            if advance is not None:
                advance(sum(infos[name].nbytes for name in shard_names))
    if split.is_sharded:
        index = {"metadata": {"total_parameters": sum(p.numel() for p in model.parameters()), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in CONFIG_FILES:
        data = _read_stored(store, prefix + HF_META + name)
        if data is not None:
            (folder / name).write_bytes(data)


def _sync_folder(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def export_hf(store: TierStore, out: str | Path, *, prefix: str = "",
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, progress: bool = False) -> int:
    """Write the model imported under ``prefix`` to the folder ``out`` as ``save_pretrained`` would (module doc).

    ``out`` must not exist or be an empty folder. ``max_shard_size`` is bytes or a string
    (``"500MB"``, ``"2GiB"``); a tensor larger than it gets a shard of its own. Returns the number
    of tensors written. Raises ``CheckpointError`` when the store holds no model config under
    ``prefix``, lacks some of the model's tensors, or ``out`` cannot be written.
    """
    out = Path(out)
    limit = parse_size(max_shard_size, name="max_shard_size")
    if limit <= 0:
        raise ConfigError(f"max_shard_size must be more than 0 bytes, got {max_shard_size!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty folder; choose a new folder or remove it",
                              path=str(out))
    model = build_empty_model(stored_config(store, prefix))
    names = _model_keys(store, prefix, model)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous export that was killed
        tmp.mkdir(parents=True)
        _write_folder(store, tmp, prefix, names, model, limit, progress)
        _sync_folder(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write {out}: {exc.strerror or exc}", path=str(out)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(names)
