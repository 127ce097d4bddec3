"""Predicted decode speed of Qwen3-VL 2B/4B/8B on the seed laptop: the planner beside its peers.

Unit sizes are computed from the published shapes (no weights are needed), bf16 stored at the
~1.46x the byte-grouped zstd codec reaches on bf16 weights. Every number printed is a prediction of
the cost model in ``tierstore/placement.py``, not a measurement.

    python tools/plan_seed_laptop.py [--memory 3GiB] [--markdown]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from tierstore.config import format_size, parse_size
from tierstore.errors import ConfigError
from tierstore.plan.placement import Machine, ModelUnits, Unit, baselines, physical_bound, plan

RATIO = 1.46
"""L3 compression of bf16 weights (byte-grouped zstd, DESIGN.md)."""


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    out_hidden: int
    vision_depth: int = 24
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    deepstack: int = 3


SHAPES = (Shape("Qwen3-VL-2B", 2048, 28, 16, 8, 128, 6144, 151936, True, 2048),
          Shape("Qwen3-VL-4B", 2560, 36, 32, 8, 128, 9728, 151936, True, 2560),
          Shape("Qwen3-VL-8B", 4096, 36, 32, 8, 128, 12288, 151936, False, 4096))


def units(shape: Shape) -> ModelUnits:
    """The planner's view of a Qwen3-VL at ``shape``, in bf16."""
    h, hd = shape.hidden, shape.head_dim
    attn = h * shape.heads * hd * 2 + h * shape.kv_heads * hd * 2 + 2 * hd
    layer = attn + 3 * h * shape.intermediate + 2 * h
    vh, vi = shape.vision_hidden, shape.vision_intermediate
    block = (3 * vh * vh + 3 * vh) + (vh * vh + vh) + (vh * vi + vi) + (vi * vh + vh) + 4 * vh
    merged = 4 * vh
    merger = 2 * merged + merged * merged + merged + merged * shape.out_hidden + shape.out_hidden
    embed = shape.vocab * h
    vision_fixed = 3 * 2 * 16 * 16 * vh + vh + 2304 * vh + (1 + shape.deepstack) * merger
    fixed = embed * (1 if shape.tied else 2) + h + vision_fixed

    def unit(name: str, params: int, decoder: bool) -> Unit:
        return Unit(name, 2 * params, int(2 * params / RATIO), params, decoder)

    vision = [unit(f"model.visual.blocks.{i}", block, False) for i in range(shape.vision_depth)]
    text = [unit(f"model.language_model.layers.{i}", layer, True) for i in range(shape.layers)]
    return ModelUnits(tuple(vision + text), 2 * fixed, 2 * embed, 2 * shape.layers * shape.kv_heads * hd * 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", action="append", help="host memory budgets (default 3GiB and 6GiB)")
    args = parser.parse_args()
    for text in args.memory or ["3GiB", "6GiB"]:
        table(parse_size(text, name="memory"))


def table(memory: int) -> None:
    print(f"\npredictions (not measurements), host budget {format_size(memory)}, prefill 512 tokens, context 4096\n")
    print("| model | bf16 | link | planner | plan (L1/L2-GPU/CPU/L3 layers) | stream everything | "
          "accelerate offload | CPU only | physical bound |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape in SHAPES:
        model = units(shape)
        total = model.fixed_bytes + sum(u.nbytes for u in model.units)
        for lanes in (4, 16):
            machine = Machine.seed_laptop(lanes=lanes)
            try:
                plan(model, machine, memory=memory)
            except ConfigError as exc:
                why = exc.message.split(":")[0]
                print(f"| {shape.name} | {format_size(total)} | x{lanes} | below the minimum: {why} | | | | | |")
                continue
            got = baselines(model, machine, memory)
            chosen = plan(model, machine, memory=memory)
            decoders = [u for u in chosen.units if u.decode_on != "-"]
            counts = [sum(u.placement == p for u in decoders) for p in ("L1", "L2->GPU", "CPU from L2")]
            counts.append(sum(u.tier == "L3" for u in decoders))
            raw = sum(u.name in chosen.raw_units for u in decoders)
            bound = physical_bound(model, machine, memory)
            cells = [f"{got[k].tokens_per_s:.2f}" for k in ("planner",)]
            cells.append("/".join(map(str, counts)) + (f", {raw} raw" if raw else "")
                         + f" ({got['planner'].decode_limit}-bound)")
            cells += [f"{got[k].tokens_per_s:.2f}" for k in ("stream everything", "accelerate offload", "CPU only")]
            print(f"| {shape.name} | {format_size(total)} | x{lanes} | " + " | ".join(cells) + f" | {1 / bound:.2f} |")


if __name__ == "__main__":
    main()
