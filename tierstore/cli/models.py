"""Models in and out of a store: ``import-hf``, ``import``, ``export``, ``export-hf`` (one library call each)."""

from __future__ import annotations

import argparse
from typing import Any

from .. import open as open_store
from ..integrations.hf_export import DEFAULT_MAX_SHARD_SIZE
from ._output import console

__all__ = ["register"]


def _codec(args: argparse.Namespace) -> dict[str, Any]:
    """``l3_compression`` for the store when ``--l3-compression`` was given (the store remembers it)."""
    return {} if args.l3_compression is None else {"l3_compression": args.l3_compression}


def cmd_import_hf(args: argparse.Namespace) -> int:
    """Import a Hugging Face model folder (config.json + safetensors shards) into a store."""
    from ..integrations.checkpoint import checkpoint_files, import_checkpoint

    checkpoint_files(args.checkpoint, require_config=True)  # a bad folder fails before any store is created
    with open_store(args.store, **_codec(args)) as db:
        count = import_checkpoint(args.checkpoint, db, prefix=args.prefix, require_config=True, progress=True)
    console.print(f"imported {count} tensors and the model config from {args.checkpoint} into {args.store}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Import one safetensors file, or every safetensors file of a folder, into a store."""
    from ..integrations.checkpoint import checkpoint_files, import_checkpoint

    checkpoint_files(args.source)  # a bad source fails before any store is created
    with open_store(args.store, **_codec(args)) as db:
        count = import_checkpoint(args.source, db, prefix=args.prefix, progress=True)
    console.print(f"imported {count} tensors from {args.source} into {args.store}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the tensors under a prefix to one safetensors file."""
    from ..integrations.checkpoint import export_safetensors

    with open_store(args.store, readonly=True, l2_cache_size=0) as db:
        count = export_safetensors(db, args.out, prefix=args.prefix, progress=True)
    console.print(f"wrote {count} tensors to {args.out}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    """Write the model under a prefix as a Hugging Face model folder (config, sharded safetensors, index)."""
    from ..integrations.hf_export import export_hf

    with open_store(args.store, readonly=True, l2_cache_size=0) as db:
        count = export_hf(db, args.out, prefix=args.prefix, max_shard_size=args.max_shard_size, progress=True)
    console.print(f"wrote {count} tensors and the model config to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the model commands to the ``tierstore`` parser."""
    hf = sub.add_parser("import-hf", help="import a Hugging Face model folder (example: tierstore import-hf "
                                          "Qwen3-VL-2B-Instruct/ qwen.ts)")
    hf.add_argument("checkpoint", help="folder with config.json and *.safetensors")
    hf.add_argument("store")
    hf.set_defaults(func=cmd_import_hf)
    imp = sub.add_parser("import", help="import safetensors (example: tierstore import weights.ts model.safetensors)")
    imp.add_argument("store")
    imp.add_argument("source", help="a .safetensors file or a folder of them")
    imp.set_defaults(func=cmd_import)
    exp = sub.add_parser("export", help="write tensors to safetensors (example: tierstore export qwen.ts "
                                        "out.safetensors)")
    exp.add_argument("store")
    exp.add_argument("out")
    exp.set_defaults(func=cmd_export)
    exp_hf = sub.add_parser("export-hf", help="write a model as a folder from_pretrained loads (example: tierstore "
                                              "export-hf qwen.ts Qwen3-VL-out/ --max-shard-size 1GB)")
    exp_hf.add_argument("store")
    exp_hf.add_argument("out", help="a new (or empty) folder")
    exp_hf.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="largest safetensors shard, held in memory while written "
                             f"(default {DEFAULT_MAX_SHARD_SIZE})")
    exp_hf.set_defaults(func=cmd_export_hf)
    for command in (hf, imp, exp, exp_hf):
        command.add_argument("--prefix", default="", help="key prefix of the model's tensors in the store")
    for command in (hf, imp):
        command.add_argument("--l3-compression", default=None, metavar="CODEC",
                             help="how the store keeps blocks on disk: off (raw: no decode on every read, "
                                  "the size of the checkpoint), auto, zstd[:LEVEL], shuffle-zstd[:LEVEL], "
                                  "blosc-lz4; the store remembers it (default: the store's setting, auto "
                                  "for a new store)")
