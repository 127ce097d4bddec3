"""The `tierstore` command: the demo (the README's main job) and the listing commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tierstore
from tierstore.cli import main


def test_demo_runs_and_shows_cold_and_warm_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--store", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "cold (from L3)" in out and "warm (from L2)" in out and "model.layers.3.mlp.weight" in out
    with tierstore.open(tmp_path / "demo", readonly=True) as db:
        assert len(db) == 8


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


def test_errors_are_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(tmp_path / "missing")]) == 1
    assert "no tierstore store" in capsys.readouterr().err
    with tierstore.open(tmp_path / "s") as db:
        db.put("x", torch.ones(1))
    assert main(["info", str(tmp_path / "s"), "nope"]) == 1
    assert "no block 'nope'" in capsys.readouterr().err
