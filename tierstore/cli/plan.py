"""``tierstore plan``: where each unit of a stored model lives and computes, and the predicted speed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import open as open_store
from ..config import format_size, parse_size
from ..integrations.plan_units import decode_shapes, model_units
from ..plan.machine import Machine
from ..plan.placement import Plan, UnitPlan, plan
from ._output import add_json, console, emit, table

__all__ = ["register"]


def _machine(spec: str, store: str, prefix: str = "") -> Machine:
    if spec == "probe":
        with open_store(store, readonly=True, l2_cache_size=0) as db:
            layer, head = decode_shapes(db, prefix=prefix)  # the matvec rates at this model's own shapes
        with console.status("measuring disk, memory, codecs and matmul"):
            return Machine.from_probe(store, layer_shapes=layer or None, head_shape=head)
    if spec == "seed-laptop":
        return Machine.seed_laptop()
    return Machine.from_file(spec)


def _runs(units: tuple[UnitPlan, ...], raw: set[str]) -> list[list[UnitPlan]]:
    """Consecutive units of one list (``...layers``) with the same placement and storage: one table row each."""
    runs: list[list[UnitPlan]] = []
    for unit in units:
        last = runs[-1][-1] if runs else None
        same = last is not None and last.name.rpartition(".")[0] == unit.name.rpartition(".")[0] and \
            (last.tier, last.decode_on, last.prefill_on, last.fetch, last.name in raw) == \
            (unit.tier, unit.decode_on, unit.prefill_on, unit.fetch, unit.name in raw)
        if same:
            runs[-1].append(unit)
        else:
            runs.append([unit])
    return runs


def _rows(chosen: Plan) -> list[list[Any]]:
    rows = []
    raw = set(chosen.raw_units)
    for run in _runs(chosen.units, raw):
        group, _, first = run[0].name.rpartition(".")
        last = run[-1].name.rpartition(".")[2]
        name = f"{group}.{first}" if len(run) == 1 else f"{group}.{first}-{last}"
        if len(name) > 30:
            name = "..." + name[-27:]
        rows.append([name, len(run), format_size(sum(u.nbytes for u in run)), run[0].placement, run[0].decode_on,
                     run[0].prefill_on, "raw" if run[0].name in raw else "-"])
    return rows


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan the placement of the model in STORE for a machine and a memory budget; print it with predictions."""
    machine = _machine(args.hardware, args.store, args.prefix)
    with open_store(args.store, readonly=True, l2_cache_size=0) as db:
        model = model_units(db, prefix=args.prefix)
    memory = parse_size(args.memory, name="memory") if args.memory is not None else None
    chosen = plan(model, machine, memory=memory, prefetch=args.prefetch, context=args.context,
                  rewrite=args.apply or not args.as_stored, mapped=args.mapped)
    p = chosen.prediction

    def render() -> Any:
        return table(f"plan for {Path(args.store).name} on {machine.name}",
                     ["units", "n", "size", "placement", "decode", "prefill", "store"], _rows(chosen))

    emit(args, chosen.to_dict(), render)
    rewritten = None
    if args.apply and chosen.raw_units:
        from ..integrations.plan_apply import store_raw

        with console.status(f"storing {len(chosen.raw_units)} units raw"):
            rewritten = store_raw(args.store, chosen, prefix=args.prefix)
    if not args.json:
        console.print(f"memory {format_size(chosen.memory)} (minimum {format_size(chosen.minimum)}): fixed weights "
                      f"{format_size(chosen.fixed_bytes)} ({'GPU' if chosen.head_on == 'cuda' else 'CPU'}), "
                      f"streaming reserve {format_size(chosen.working_bytes)}, KV {format_size(chosen.kv_bytes)} "
                      f"in {chosen.kv_tier}, vision cache {format_size(chosen.vision_cache_bytes)}")
        if chosen.host is not None:
            host = chosen.host
            console.print(f"L2 {format_size(chosen.l2_bytes)} (held {format_size(host.held)}, working "
                          f"{format_size(host.l2_working)}, slack {format_size(host.l2_slack)}; open the store with "
                          f"l2_cache_size={chosen.l2_bytes}), mapped pages beside it {format_size(host.mapped)}")
        console.print(f"predicted (cost model, not measured): TTFT {p.ttft_s * 1000:.0f} ms, decode "
                      f"{p.decode_s * 1000:.1f} ms/token ({p.tokens_per_s:.2f} tokens/s, {p.decode_limit}-bound), "
                      f"{format_size(p.disk_bytes_per_token)} from disk and {format_size(p.link_bytes_per_token)} "
                      "over the link per token")
        console.print(_cache_note(chosen))
        if chosen.raw_units:
            console.print(f"{len(chosen.raw_units)} units stream raw (store column): "
                          + (f"rewrote {rewritten} tensors raw" if rewritten is not None
                             else "the prediction assumes them stored raw; --apply rewrites them"))
    return 0


def _cache_note(chosen: Plan) -> str:
    """The page-cache assumption behind the prediction, in words."""
    files, room = format_size(chosen.l3_file_bytes), format_size(chosen.page_cache_room)
    if chosen.prediction.page_cache:
        return (f"assumes the streamed L3 files ({files}) stay in the page cache after the first pass: they fit "
                f"in the {room} of free RAM beside the budget")
    if chosen.l3_file_bytes:
        return f"assumes the streamed L3 files ({files}) are read from the disk every pass ({room} of page cache)"
    return "nothing streams from L3"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``plan`` to the ``tierstore`` parser."""
    cmd = sub.add_parser("plan", help="where each unit lives and computes, with predicted speed "
                                      "(example: tierstore plan qwen.ts --memory 3GiB --hardware seed-laptop)")
    cmd.add_argument("store", help="a store holding a model imported with import-hf")
    cmd.add_argument("--memory", help="host memory budget for weights and caches (default: free RAM), e.g. 3GiB")
    cmd.add_argument("--hardware", default="probe",
                     help="probe (measure here, a few seconds), seed-laptop (the original request's laptop), "
                          "or a JSON file of Machine fields")
    cmd.add_argument("--prefix", default="", help="the prefix the model was imported under")
    cmd.add_argument("--prefetch", type=int, default=2, help="units read ahead (default 2)")
    cmd.add_argument("--context", type=int, default=4096, help="tokens of KV cache to budget (default 4096)")
    cmd.add_argument("--apply", action="store_true",
                     help="rewrite the units the plan streams raw (store column) as raw L3 blocks, in one transaction")
    cmd.add_argument("--as-stored", action="store_true",
                     help="plan the units as the store keeps them (no raw rewrites)")
    cmd.add_argument("--mapped", action=argparse.BooleanOptionalAction, default=True,
                     help="raw units stream as page-cache views, as load_streamed maps them (default); "
                          "--no-mapped: copied into L2, as load_streamed(mapped=False)")
    cmd.set_defaults(func=cmd_plan)
    add_json(cmd)
