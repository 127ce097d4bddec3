"""The `tierstore` command: the demo (the README's main job) and the listing commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tierstore
from tierstore.cli import main


def test_demo_streams_a_model_and_matches_the_in_memory_one(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--store", str(tmp_path / "demo"), "--tokens", "4", "--json"]) == 0
    out = capsys.readouterr().out
    assert "tier occupancy" in out and "identical to the model held in memory in both runs" in out
    with tierstore.open(tmp_path / "demo", readonly=True) as db:
        assert "model.language_model.layers.5.mlp.down_proj.weight" in db and "__hf__/config.json" in db
    summary = json.loads(out.strip().splitlines()[-1])
    run1, run2 = summary["runs"]
    assert summary["identical"] and run1["identical"] and run2["identical"]
    assert run1["hits"]["L3"] > 0 and run2["hits"]["L3"] == 0  # the second run found every layer in L2
    assert run1["kv_prefix_restored"] == 0 and run2["kv_prefix_restored"] > 0  # the prompt's K/V came back
    assert run1["vision_tower_skipped"] == 0 and run2["vision_tower_skipped"] == 1  # the image's features too
    for run in (run1, run2):  # undecided prefetches are counted, not left out of the accuracy
        assert run["prefetch_decided"] + run["prefetch_undecided"] == run["prefetched"]
    assert run1["run"].startswith("1: cold")
    assert max(len(line) for line in out.splitlines()[:-1]) <= 100  # the tables fit 100 columns (JSON line aside)
    assert main(["demo", "--store", str(tmp_path / "demo"), "--tokens", "2"]) == 0  # the model already there
    out = capsys.readouterr().out
    assert "the one already in" in out and "1: cold" not in out and "1: reused store" in out
    assert "used/decided/undecided" in out


def test_listing_commands_print_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s"
    with tierstore.open(store) as db:
        db.put("a/b", torch.zeros(3, 4, dtype=torch.bfloat16))
        db.get("a/b")
    assert main(["ls", str(store), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["key"] == "a/b" and rows[0]["shape"] == [3, 4] and rows[0]["dtype"] == "bfloat16"
    assert main(["info", str(store), "a/b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nbytes"] == 24
    assert main(["stats", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blocks"] == 1
    assert main(["history", str(store), "--json"]) == 0
    assert [r["op"] for r in json.loads(capsys.readouterr().out)] == ["get", "put"]


def test_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(tmp_path / "missing")]) == 2
    assert "no tierstore store" in capsys.readouterr().err
    with tierstore.open(tmp_path / "s") as db:
        db.put("x", torch.ones(1))
    assert main(["info", str(tmp_path / "s"), "nope"]) == 2
    assert "no block 'nope'" in capsys.readouterr().err


def test_demo_with_a_checkpoint_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tierstore.integrations.tiny_model import save_tiny_checkpoint, tiny_config

    folder = save_tiny_checkpoint(tmp_path / "ckpt", config=tiny_config(layers=2, vision_depth=1))
    assert main(["demo", "--checkpoint", str(folder), "--tokens", "3", "--l2", "1MiB"]) == 0
    out = capsys.readouterr().out
    assert f"model: {folder}" in out and "identical to the model held in memory in both runs" in out


def test_info_shows_statistics_history_and_prediction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s"
    with tierstore.open(store) as db:
        for key in ("a", "b", "c"):
            db.put(key, torch.ones(4))
        for _ in range(3):
            for key in ("a", "b", "c"):
                db.get(key)
    assert main(["info", str(store), "b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["statistics"]["get_count"] == 3 and data["statistics"]["put_count"] == 1
    assert [p["key"] for p in data["prediction"]["prefetches"]] == ["c"]  # c always followed b
    assert data["prediction"]["expected_at"] > data["statistics"]["last_access"]
    assert [r["op"] for r in data["recent"]] == ["get", "get", "get", "put"]
    assert main(["info", str(store), "a"]) == 0
    out = capsys.readouterr().out
    assert "a get prefetches" in out and "b (1.00)" in out and "recent accesses" in out



def test_demo_under_a_memory_budget_smaller_than_the_model(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--memory below the model's size: L2 sized from the budget, the reference computed in another process."""
    assert main(["demo", "--store", str(tmp_path / "demo"), "--tokens", "3", "--memory", "24MiB", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["identical"] and summary["reference"] == "the model held in memory in another process"
    assert summary["memory"] == 24 << 20 and summary["held_units"] > 0
    # the streamed runs' own peak (VmHWM reset after the import and the reference), within the process's
    assert 0 < summary["streaming_peak_rss"] <= summary["peak_rss"]
    assert summary["overhead"] == summary["streaming_peak_rss"] - (24 << 20)
    with tierstore.open(tmp_path / "demo", readonly=True, l2_cache_size=0) as db:
        from tierstore.integrations.stream_budget import memory_split

        split = memory_split(db, "24MiB")
        assert db.stats().logical_bytes > 24 << 20
    assert summary["tiers"]["L2"]["capacity"] <= split.l2_bytes
    run1, run2 = summary["runs"]
    assert run2["hits"]["L3"] < run1["hits"]["L3"]  # the held units came from L2
    assert main(["demo", "--store", str(tmp_path / "demo"), "--tokens", "1", "--memory", str(split.minimum - 1)]) == 2
    assert f"at least {split.minimum} bytes" in capsys.readouterr().err
