"""The demo's reference run in a process of its own: the whole model in memory, greedy tokens as JSON.

``tierstore demo --memory M`` runs this when the model does not fit in M, so the streamed run never
shares a process (or a moment) with a full copy of the weights::

    python -m tierstore.cli.demo_reference --store STORE --tokens 8
    python -m tierstore.cli.demo_reference --checkpoint DIR --tokens 8

It prints one line of JSON: ``{"sequence": [...], "peak_rss": bytes}``.
"""

from __future__ import annotations

import argparse
import json
import resource
from typing import Any

import torch

from .. import open as open_store
from ..integrations.checkpoint import read_json
from .demo import PROMPT, SUFFIX, _device, _generate

__all__ = ["main"]


def _model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None) -> tuple[Any, Any]:
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    if args.checkpoint:
        model = Qwen3VLForConditionalGeneration.from_pretrained(args.checkpoint, local_files_only=True).eval()
        model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
        return model, model.config
    from ..integrations.streaming import load_streamed

    with open_store(args.store, readonly=True, l2_cache_size=0) as db:
        raw = read_json(db, "config.json")
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        return load_streamed(db, device=device, dtype=dtype, resident_bytes=1 << 62), config


def main(argv: list[str] | None = None) -> int:
    """Run the reference generation and print its tokens."""
    from transformers.utils import logging

    from ..integrations.tiny_model import synthetic_inputs

    parser = argparse.ArgumentParser(prog="python -m tierstore.cli.demo_reference", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store")
    source.add_argument("--checkpoint")
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args(argv)
    logging.disable_progress_bar()
    device, dtype = _device()
    model, config = _model(args, device, dtype)
    inputs = {k: v.to(device) for k, v in synthetic_inputs(PROMPT, image_seed=0, suffix=SUFFIX, config=config).items()}
    if dtype is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    out = _generate(model, inputs, args.tokens)
    print(json.dumps({"sequence": out.tolist(),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
