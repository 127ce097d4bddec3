"""The cost model's terms with injected machine facts (no timing): fetching, shared cores, the page cache.

And the planner's choice of how streamed units are stored, ``tierstore plan --apply`` on a tiny model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import tierstore
from tests.model_fixtures import tiny_llama_store
from tierstore.cli import main
from tierstore.integrations.plan_apply import store_raw
from tierstore.integrations.plan_units import model_units
from tierstore.integrations.stream_budget import memory_split
from tierstore.integrations.streaming import load_streamed
from tierstore.plan.page_cache import PROCESS_OVERHEAD, cache_room
from tierstore.plan.placement import Machine, ModelUnits, Unit, UnitPlan, baselines, plan, predict

MiB, GiB = 1 << 20, 1 << 30
GB = 10**9
BOX = Machine(name="box", disk_read=1 * GB, decode=2 * GB, memcpy=10 * GB, cpu_flops=1e15, ram_free=4 * GiB,
              cpu_matvec=1 * GB, cores=2, page_cache_read=4 * GB, checksum=8 * GB, stream_spare_core=False)
"""Two cores, zstd at 1 GB/s per core, matvec at 1 GB/s on both cores; compute FLOPs never bind; a streamed
decode computes on both cores beside the fetch thread (``decode_threads=None``; the default's core left to
the fetch thread is in test_placement.py)."""
LAYER = 100 * MiB


def _model(layers: int = 4, ratio: float = 1.5) -> ModelUnits:
    units = tuple(Unit(f"layers.{i}", LAYER, int(LAYER / ratio), LAYER // 2) for i in range(layers))
    return ModelUnits(units, fixed_bytes=0)


def _streamed(model: ModelUnits, fetch: str = "stored") -> list[UnitPlan]:
    return [UnitPlan(u.name, u.nbytes, "L3", "cpu", "cpu", fetch) for u in model.units]


def test_fetch_seconds_per_mode() -> None:
    """decode: stored / page_cache_read + bytes / (decode / cores) + bytes / checksum; read: no decode; map: 0."""
    stored = int(LAYER / 1.5)
    assert BOX.fetch_seconds(LAYER, stored, "decode") == pytest.approx(stored / 4e9 + LAYER / 1e9 + LAYER / 8e9)
    assert BOX.fetch_seconds(LAYER, stored, "read") == pytest.approx(LAYER / 4e9 + LAYER / 8e9)
    assert BOX.fetch_seconds(LAYER, stored, "map") == 0.0
    bare = replace(BOX, page_cache_read=None, checksum=None)  # not measured: memcpy, and no checksum term
    assert bare.fetch_seconds(LAYER, LAYER, "read") == pytest.approx(LAYER / 10e9)


def test_fetching_adds_to_compute_when_compute_uses_every_core() -> None:
    """k = c: the CPU side is cpu + F / c (decode steals the cores the matvec needs), not max(cpu, F / c)."""
    model = _model()
    p = predict(BOX, model, _streamed(model), memory=0)
    compute = 4 * LAYER / 1e9
    fetch = 4 * BOX.fetch_seconds(LAYER, int(LAYER / 1.5), "decode")
    assert p.decode_limit == "cpu+fetch"
    assert p.decode_s == pytest.approx(max(compute + fetch / 2, 4 * int(LAYER / 1.5) / 1e9))


def test_spare_cores_overlap_fetching_with_compute() -> None:
    """k < c: fetching runs on the spare cores first: max(cpu, (k * cpu + F) / c)."""
    model = _model()
    compute = 4 * LAYER / 1e9
    fast_disk = replace(BOX, disk_read=1e15, ram_free=64 * GiB)
    one = replace(fast_disk, compute_threads=1, cores=4, decode=4 * GB)  # three spare cores
    fetch = 4 * one.fetch_seconds(LAYER, int(LAYER / 1.5), "decode")
    assert fetch < 3 * compute  # fits on the spare cores: hidden
    assert predict(one, model, _streamed(model), memory=0).decode_s == pytest.approx(compute)
    slow = replace(one, decode=0.4 * GB)  # 0.1 GB/s per core: more than the spare cores can hide
    fetch = 4 * slow.fetch_seconds(LAYER, int(LAYER / 1.5), "decode")
    assert predict(slow, model, _streamed(model), memory=0).decode_s == pytest.approx((compute + fetch) / 4)


def test_page_cache_serves_files_that_fit_beside_the_budget() -> None:
    """Files that fit in ram_free - memory - 1 GiB are read from memory after the first pass; else from the disk."""
    model = _model(ratio=1.0)  # raw: 400 MiB of files
    slow_disk = replace(BOX, disk_read=0.1 * GB)
    assert cache_room(slow_disk, 1 * GiB) == 4 * GiB - 1 * GiB - PROCESS_OVERHEAD
    cached = predict(slow_disk, model, _streamed(model), memory=1 * GiB)
    assert cached.page_cache and cached.disk_bytes_per_token == 0 and cached.decode_limit == "cpu+fetch"
    assert cached.l3_bytes_per_token == 4 * LAYER
    cold = predict(slow_disk, model, _streamed(model), memory=3 * GiB - 300 * MiB)  # 300 MiB of room: no fit
    assert not cold.page_cache and cold.disk_bytes_per_token == 4 * LAYER
    assert cold.decode_s == pytest.approx(4 * LAYER / 0.1e9) and cold.decode_limit == "disk"
    assert predict(slow_disk, model, _streamed(model)).disk_bytes_per_token == 4 * LAYER  # no budget: no cache
    assert cached.ttft_s == pytest.approx(cold.ttft_s)  # TTFT is the cold first pass either way


def test_the_planner_streams_raw_where_decoding_would_bind() -> None:
    """Decode-bound (files cached): every streamed decoder unit raw; disk-bound: kept compressed (smaller)."""
    model = _model(layers=6)
    # holds one layer, streams five (through L2: the minimum of mapped=False has its slack unit)
    memory = plan(model, BOX, memory=64 * GiB, context=0, mapped=False).minimum + LAYER
    roomy = replace(BOX, ram_free=memory + PROCESS_OVERHEAD + 2 * GiB)
    chosen = plan(model, roomy, memory=memory, context=0, mapped=False)  # copies into L2, as mapped=False streams
    streamed = [u.name for u in chosen.units if u.tier == "L3"]
    assert len(streamed) == 5 and chosen.raw_units == tuple(streamed)
    assert {u.fetch for u in chosen.units if u.tier == "L3"} == {"read"} and chosen.prediction.page_cache
    as_stored = plan(model, roomy, memory=memory, context=0, rewrite=False, mapped=False)
    assert as_stored.raw_units == () and as_stored.prediction.decode_s > chosen.prediction.decode_s
    mapped = plan(model, roomy, memory=memory, context=0, mapped=True, verify_maps="always")
    maps = [u for u in mapped.units if u.tier == "L3"]
    assert {u.fetch for u in maps} == {"map"}
    # the matvec, and the crc32c of every mapped byte (l3_verify_maps="always") on the cores it shares
    assert mapped.prediction.decode_s == pytest.approx(6 * LAYER / 1e9 + len(maps) * LAYER / 8e9 / 2)
    once = plan(model, roomy, memory=memory, context=0, mapped=True, verify_maps="once")
    assert once.prediction.decode_s == pytest.approx(6 * LAYER / 1e9)  # checked on the first pass only
    # "disk" (the default) checks a map that reads from the disk: with the files cached, the first pass only
    disk = plan(model, roomy, memory=memory, context=0, mapped=True)
    assert disk.prediction.page_cache and disk.prediction.decode_s == pytest.approx(once.prediction.decode_s)
    raw = _model(layers=6, ratio=1.0)  # stored raw: every streamed unit a map
    uncached = replace(roomy, ram_free=memory)  # no room for the page cache: every pass reads and checks
    by_mode = {mode: plan(raw, uncached, memory=memory, context=0, verify_maps=mode).prediction
               for mode in ("disk", "always", "once")}
    assert not by_mode["disk"].page_cache
    assert by_mode["disk"].decode_s == pytest.approx(by_mode["always"].decode_s)
    assert by_mode["disk"].decode_s > by_mode["once"].decode_s
    tight = replace(BOX, ram_free=memory, disk_read=0.2 * GB)  # no page cache, slow disk: fewer bytes win
    assert plan(model, tight, memory=memory, context=0).raw_units == ()


def test_accelerate_offload_reads_the_page_cache_when_its_files_fit() -> None:
    model = ModelUnits(tuple(Unit(f"layers.{i}", LAYER, LAYER, LAYER // 2) for i in range(8)), fixed_bytes=0,
                       kv_bytes_per_token=0)
    memory = 4 * LAYER
    roomy = replace(BOX, ram_free=16 * GiB, disk_read=0.1 * GB)
    fits = baselines(model, roomy, memory)["accelerate offload"]
    assert fits.page_cache and fits.decode_s == pytest.approx(8 * LAYER / 1e9 + 4 * LAYER / 4e9)
    cold = baselines(model, replace(roomy, ram_free=memory), memory)["accelerate offload"]
    assert not cold.page_cache and cold.decode_s == pytest.approx(8 * LAYER / 1e9 + 4 * LAYER / 0.1e9)


# -- plan --apply on a stored model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A tiny bf16 Llama of 6 decoder layers (bf16 compresses: its units are stored compressed)."""
    return tiny_llama_store(tmp_path_factory, 6, dtype=torch.bfloat16)


def test_plan_apply_stores_the_raw_units_raw_and_the_tokens_stay(checkpoint: tuple[Any, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    reference, original = checkpoint
    path = tmp_path / "store"
    shutil.copytree(original, path)
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        model = model_units(db)
        layer = model.units[0].nbytes
        assert all(u.compressed for u in model.units)
    memory = plan(model, BOX, memory=64 * GiB, context=0).minimum + 2 * layer
    machine_file = tmp_path / "box.json"
    machine_file.write_text(json.dumps(replace(BOX, ram_free=8 * GiB).to_dict()))
    args = ["plan", str(path), "--hardware", str(machine_file), "--memory", str(memory), "--context", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "raw" in out and "page cache" in out and "--apply rewrites them" in out
    assert max(len(line) for line in out.splitlines()) <= 100
    chosen = plan(model, replace(BOX, ram_free=8 * GiB), memory=memory, context=0)
    assert 0 < len(chosen.raw_units) < len(model.units)
    assert main([*args, "--apply"]) == 0
    assert "rewrote" in capsys.readouterr().out
    prompt = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    with torch.inference_mode():
        expected = reference.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        for unit in chosen.units:
            codecs = {db.info(k).codec for k in db.keys(f"{unit.name}.")}
            assert codecs == {"raw"} if unit.name in chosen.raw_units else "raw" not in codecs, (unit.name, codecs)
        after = model_units(db)
        assert plan(after, replace(BOX, ram_free=8 * GiB), memory=memory, context=0).raw_units == ()
    with tierstore.open(path, readonly=True, l2_cache_size=0) as db:
        l2 = memory_split(db, memory, prefetch=2).l2_bytes
    with tierstore.open(path, readonly=True, l2_cache_size=l2) as db:
        streamed = load_streamed(db, memory=memory, prefetch=2)
        with torch.inference_mode():
            got = streamed.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
        streamed.weight_streamer.close()
    assert torch.equal(got, expected)
    with tierstore.open(path, l2_cache_size=0) as db:  # the store's own setting is kept for later puts
        db.put("extra", torch.ones(4096, dtype=torch.bfloat16))
        assert db.info("extra").codec != "raw"
    assert store_raw(path, chosen) == 0  # applied already: nothing left to rewrite


def test_a_fetch_thread_beside_compute_on_every_core_slows_both_by_their_measured_shares() -> None:
    """With ``compute_share`` measured, fetching beside a product on every core costs what the shares say.

    On the 2-core bench VM a one-token matvec keeps ~0.5 of its speed beside a checksumming thread
    (torch's threads wait for the displaced one), not the 2/3 an even share of the cores gives.
    """
    model = _model(ratio=1.0)  # raw: mapped, checked (crc32c) on every pass
    shared = replace(BOX, disk_read=1e15, ram_free=64 * GiB, compute_share=0.5, fetch_share=0.8, map_populate=8 * GB)
    compute = 4 * LAYER / 1e9
    fetch = 4 * shared.fetch_seconds(LAYER, LAYER, "map", checked=True)
    both = min(compute / 0.5, fetch / 0.8)
    expected = both + (compute - 0.5 * both) + (fetch - 0.8 * both)
    got = predict(shared, model, _streamed(model, "map"), memory=0, verify_maps="always").decode_s
    assert got == pytest.approx(expected) and got > max(compute, (2 * compute + fetch) / 2)
    assert predict(replace(shared, compute_share=None), model, _streamed(model, "map"), memory=0,
                   verify_maps="always").decode_s == \
        pytest.approx(max(compute, (2 * compute + fetch) / 2))  # not measured: an even share
