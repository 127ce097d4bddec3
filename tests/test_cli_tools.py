"""The catalog tools against real stores made here: ``stats``, ``plot``, ``--json`` everywhere, and
one-line errors for a missing store, a locked store and a bad key."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tierstore
from tierstore.activity import access_windows, load_counters, timeline
from tierstore.cli import main


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """20 blocks; 10 of them read three times (L2 holds them after the first read)."""
    path = tmp_path / "s"
    with tierstore.open(path, l2_cache_size="4MiB", fsync=False) as db:
        for i in range(20):
            db.put(f"layer.{i:02d}", torch.full((4096,), float(i)))
    with tierstore.open(path, l2_cache_size="4MiB") as db:  # a fresh handle: L2 starts cold
        for _ in range(3):
            for i in range(10):
                db.get(f"layer.{i:02d}")
        db.delete("layer.19")
    return path


def test_stats_reports_tiers_hit_rates_and_time_windows(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", str(store), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    tiers = data["tier_overview"]
    assert tiers["L2"]["capacity"] == 4 << 20 and tiers["L2"]["hits"] == 20 and tiers["L3"]["hits"] == 10
    assert tiers["L2"]["hit_rate"] == pytest.approx(20 / 30) and tiers["L3"]["hit_rate"] == pytest.approx(10 / 30)
    assert tiers["L2"]["promotions"] == 10  # the ten cold reads brought their blocks into L2
    assert tiers["L3"]["blocks"] == 19 and tiers["L3"]["used"] > 0 and 0 <= tiers["L3"]["fragmentation"] < 1
    assert tiers["L3"]["dead_bytes"] > 0  # the deleted block's packed bytes
    for window in ("1m", "1h", "1d"):
        assert data["windows"][window] == {"get": 30, "put": 20, "delete": 1, "L1": 0, "L2": 20, "L3": 10}
    assert main(["stats", str(store)]) == 0
    out = capsys.readouterr().out
    assert "promotions 10" in out and "66.7%" in out and "fragmentation" in out and "1h" in out


def test_windows_count_only_recent_accesses(store: Path) -> None:
    with tierstore.open(store, readonly=True) as db:
        now = time.time()
        assert access_windows(db._catalog, now + 120)["1m"]["get"] == 0
        assert access_windows(db._catalog, now + 120)["1h"]["get"] == 30
        assert access_windows(db._catalog, now + 2 * 86400)["1d"] == {
            "get": 0, "put": 0, "delete": 0, "L1": 0, "L2": 0, "L3": 0}
        assert load_counters(db._catalog)["L2"]["misses"] >= 10


def test_timeline_bins_the_log(store: Path) -> None:
    with tierstore.open(store, readonly=True) as db:
        line = timeline(db._catalog, bins=10, top=5)
    assert sum(int(v.sum()) for v in line.served.values()) == 30 and int(line.puts.sum()) == 20
    assert line.blocks[-1] == 19 and line.logical_bytes[-1] == 19 * 4096 * 4
    assert line.heat.shape == (5, 10) and line.heat_keys[0] == "layer.00" and int(line.heat[0].sum()) == 4
    rate = line.hit_rate[~np.isnan(line.hit_rate)]
    assert len(rate) and rate.min() >= 0.0 and rate.max() <= 1.0


def test_plot_writes_a_png_of_the_asked_size(store: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "use.png"
    assert main(["plot", str(store), "-o", str(out), "--width", "6", "--height", "5", "--dpi", "50"]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (300, 250)
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn


@pytest.mark.parametrize("argv", [["ls", "{s}"], ["info", "{s}", "layer.03"], ["stats", "{s}"], ["history", "{s}"],
                                  ["verify", "{s}"], ["gc", "{s}"], ["compact", "{s}"], ["probe", "{s}"]])
def test_every_listing_command_prints_json(store: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([a.format(s=store) for a in argv] + ["--json"]) == 0
    json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv", [["ls"], ["info", "{s}", "k"], ["stats"], ["history"], ["verify"], ["gc"],
                                  ["compact"], ["probe"], ["plot", "{s}", "-o", "{s}.png"]])
def test_a_missing_store_is_one_line(tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    args = [a.format(s=missing) for a in argv]
    if "{s}" not in " ".join(argv):
        args.insert(1, str(missing))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tierstore: ") and err.count("\n") == 1 and "no tierstore store" in err
    assert not missing.exists()


@pytest.mark.parametrize("command", ["verify", "gc", "compact"])
def test_a_locked_store_is_one_line(store: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with tierstore.open(store, l2_cache_size=0):
        assert main([command, str(store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tierstore: ") and err.count("\n") == 1 and "already open for writing" in err


def test_read_commands_work_while_a_writer_holds_the_store(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tierstore.open(store, l2_cache_size=0):
        assert main(["ls", str(store), "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)) == 19


@pytest.mark.parametrize("key", ["", "a\x00b", "x" * 2000, "missing"])
def test_a_bad_key_is_one_line(store: Path, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(store), key]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tierstore: ") and err.count("\n") == 1 and "Traceback" not in err


def test_a_bad_option_value_is_one_line(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compact", str(store), "--min-fill", "2"]) == 2
    assert "min_fill" in capsys.readouterr().err
