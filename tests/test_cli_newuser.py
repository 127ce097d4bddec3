"""The CLI as a new user meets it: one-line errors (exit 2), pipes, consistent numbers, no network, packaging."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import tierstore
from tierstore.cli import ERROR_EXIT, main

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("tierstore: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_gc_and_compact_keep_the_stores_l2_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s"
    with tierstore.open(store, l2_cache_size="8MiB") as db:
        db["w"] = torch.randn(1024)
    assert main(["gc", str(store), "--json"]) == 0
    assert main(["compact", str(store), "--json"]) == 0
    capsys.readouterr()
    with tierstore.open(store) as db:  # no config given: the remembered one
        assert db.config.l2_cache_size == 8 << 20
        assert db.prefetch("w", tier="L2").result() == ["w"]


def test_demo_with_a_missing_or_empty_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and the demo must never need it: it checks the folder first
    assert main(["demo", "--checkpoint", str(tmp_path / "nonexistent"), "--store", str(tmp_path / "s")]) == ERROR_EXIT
    _one_line_error(capsys, "not a Hugging Face model folder")
    (tmp_path / "empty").mkdir()
    assert main(["demo", "--checkpoint", str(tmp_path / "empty")]) == ERROR_EXIT
    _one_line_error(capsys, "no config.json")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    assert main(["demo", "--checkpoint", str(tmp_path / "partial")]) == ERROR_EXIT
    _one_line_error(capsys)


def test_demo_without_the_qwen_extra_prints_a_hint(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an install without the extra sees
    assert main(["demo"]) == ERROR_EXIT
    _one_line_error(capsys, "transformers", "pip install 'tierstore[qwen]'")


def test_ls_json_into_head_has_no_broken_pipe(tmp_path: Path) -> None:
    store = tmp_path / "s"
    with tierstore.open(store) as db, db.transaction():
        for i in range(800):  # a listing far larger than a pipe's buffer
            db[f"model.layers.{i}.weight"] = torch.zeros(1)
    proc = subprocess.Popen([sys.executable, "-m", "tierstore", "ls", str(store), "--json"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().strip() == b"["
    proc.stdout.close()  # what head does after its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) != 0 and err == "", err


def test_stats_numbers_agree_with_its_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s"
    with tierstore.open(store, l2_cache_size="256MiB") as db:
        for key in "abcd":
            db[key] = torch.ones(4)
        db.get("a"), db.get("b")
        del db["c"]
    assert main(["stats", str(store), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    hour = data["windows"]["1h"]
    assert (data["gets"], data["puts"], data["deletes"]) == (hour["get"], hour["put"], hour["delete"]) == (2, 4, 1)
    assert data["hits"]["L2"] == data["tier_overview"]["L2"]["hits"] == hour["L2"] == 2
    assert data["tiers"]["L2"]["capacity"] == data["tier_overview"]["L2"]["capacity"] == 256 << 20
    assert main(["stats", str(store)]) == 0
    out = capsys.readouterr().out
    assert "2 / 4 / 1" in out and "0 / 2 / 0" in out and "256.0 MiB" in out
    assert logging.getLogger("tierstore").handlers == []  # the command's stderr handler went with the command
    l1_row = next(line for line in out.splitlines() if line.startswith("│ L1"))
    assert ("off" in l1_row) != torch.cuda.is_available() or "auto" in l1_row


def test_successors_of_a_missing_key_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tierstore.open(tmp_path / "s") as db:
        db["a"] = torch.ones(1)
    assert main(["successors", str(tmp_path / "s"), "nope"]) == ERROR_EXIT
    _one_line_error(capsys, "'nope'")
    assert main(["successors", str(tmp_path / "s"), "a", "--json"]) == 0


@pytest.mark.parametrize("argv", [["history", "{s}", "--limit", "-1"], ["history", "{s}", "--limit", "0"],
                                  ["successors", "{s}", "a", "--limit", "-3"]])
def test_negative_limits_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([a.format(s=tmp_path / "s") for a in argv])
    assert exit_.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_help_has_no_rest_markup(capsys: pytest.CaptureFixture[str]) -> None:
    commands = ["demo", "ls", "info", "stats", "history", "verify", "gc", "compact", "probe", "plot", "import-hf",
                "import", "export", "publish", "pull", "journal", "successors"]
    for argv in [[], *([c] for c in commands), ["shared", "ls"]]:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        out = capsys.readouterr().out
        assert "usage: tierstore" in out and "``" not in out and "::" not in out and ":func:" not in out


def test_version_and_python_dash_m(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"tierstore {tierstore.__version__}"
    out = subprocess.run([sys.executable, "-m", "tierstore", "--version"], env=_env(), capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == f"tierstore {tierstore.__version__}"


def test_progress_bars_count_binary_units() -> None:
    from rich.progress import Progress

    from tierstore.progress import BytesColumn, SpeedColumn

    with Progress(BytesColumn(), SpeedColumn(), disable=True) as bar:
        task = bar.add_task("x", total=30 << 20, completed=15 << 20)
        text = str(BytesColumn().render(bar.tasks[task]))
    assert text == "15.0 MiB / 30.0 MiB"


def test_missing_credentials_and_short_bucket(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with tierstore.open(tmp_path / "s") as db:
        db["m/w"] = torch.ones(2)
    # no endpoint: with no credentials, nothing may be asked of anyone (not even 169.254.169.254)
    assert main(["publish", str(tmp_path / "s"), "m/", "--url", "s3://bucket/p", "--json"]) == ERROR_EXIT
    _one_line_error(capsys, "no credentials found")
    assert main(["publish", str(tmp_path / "s"), "--url", "s3://b/p", "--json"]) == ERROR_EXIT
    _one_line_error(capsys, "bucket name 'b' is too short")


def test_publish_to_a_dead_endpoint_has_no_stray_task_errors(tmp_path: Path) -> None:
    store = tmp_path / "s"
    with tierstore.open(store) as db, db.transaction():
        for i in range(40):  # more uploads than run at once: some are cancelled while queued
            db[f"m/{i}"] = torch.randn(64, 64)
    env = {**_env(), "AWS_ACCESS_KEY_ID": "test-id", "AWS_SECRET_ACCESS_KEY": "test-secret"}
    out = subprocess.run([sys.executable, "-W", "always", "-m", "tierstore", "publish", str(store), "m/",
                          "--name", "x", "--url", "s3://bucket/p", "--endpoint", "http://127.0.0.1:9", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == ERROR_EXIT
    for stray in ("Task exception was never retrieved", "never awaited", "Task was destroyed but it is pending"):
        assert stray not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and lines[-1].startswith("tierstore: upload")
    assert all(line.startswith("tierstore: ") for line in lines)  # the degraded-mode warning too, as one line


def test_every_subpackage_and_data_file_is_packaged() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tierstore").rglob("__init__.py")}
    missing = found - set(setuptools["packages"])
    assert not missing, f"add to [tool.setuptools] packages: {missing}"
    assert "py.typed" in setuptools["package-data"]["tierstore"] and (ROOT / "tierstore" / "py.typed").is_file()
    project = config["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert not any(r.startswith("wheel") for r in config["build-system"]["requires"])
