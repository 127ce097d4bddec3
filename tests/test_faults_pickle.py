"""No pickle on any load path: pickle-bearing files planted wherever the store might read never run, and the
package source never calls an unpickler (torch.load only with weights_only=True).
"""

from __future__ import annotations

import ast
import sqlite3
from pathlib import Path

import pytest
import torch

import tierstore
from tests import faultlib

PACKAGE = Path(tierstore.__file__).resolve().parent


def _plant(store: Path, marker: Path) -> None:
    bomb = faultlib.pickle_bomb(marker)
    l3 = store / "l3"
    fake = l3 / "blocks" / "00000000000fffff"  # an orphan block folder (recovery removes it, unread)
    fake.mkdir()
    (fake / "0.0").write_bytes(bomb)
    (fake / "zarr.json").write_bytes(bomb)
    forged = l3 / "blocks" / "00000000000ffffe"  # a folder a forged row points at (read, checksum fails)
    forged.mkdir()
    (forged / "0.0").write_bytes(bomb * 200)
    (forged / "zarr.json").write_bytes(bomb)
    for name in ("weights.pt", "model.pkl", "l2.index", "l2.index.tmp", "config.pt", "data.npy"):
        (store / name).write_bytes(bomb)
    (l3 / "extra.pt").write_bytes(bomb)
    for meta in [l3 / "zarr.json", *(p / "zarr.json" for p in (l3 / "packs").iterdir() if p.is_dir())]:
        meta.write_bytes(bomb)
    con = sqlite3.connect(store / "catalog.sqlite")
    try:
        row = con.execute("SELECT nbytes FROM blocks WHERE key = 'large'").fetchone()
        sizes = (1).to_bytes(4, "little") * -(-row[0] // 4096)
        con.execute("UPDATE blocks SET l3_array = 'blocks/00000000000ffffe', l3_sizes = ?, l3_inner = 4096, "
                    "codec = 'raw' WHERE key = 'large'", (sizes,))
        con.execute("UPDATE store_meta SET value = ? WHERE name = 'config'", (bomb,))
        con.execute("INSERT INTO store_meta (name, value) VALUES ('pickle', ?)", (bomb,))
        con.commit()
    finally:
        con.close()


def test_planted_pickles_never_run(tmp_path: Path) -> None:
    store, marker = tmp_path / "store", tmp_path / "marker"
    with tierstore.open(store, l2_cache_size="2MiB", l2_file_backed=True) as db:
        db.put("small", torch.arange(10))
        db.put("large", torch.randn(100_000))
    _plant(store, marker)
    for readonly in (True, False, False):
        try:
            with tierstore.open(store, readonly=readonly, l2_cache_size="2MiB", l2_file_backed=not readonly) as db:
                assert torch.equal(db.get("small"), torch.arange(10))
                with pytest.raises(tierstore.CorruptBlockError):
                    db.get("large")
                list(db.keys())
                db.stats()
                db.info("small")
        except tierstore.TierStoreError as exc:  # a typed refusal is fine; running the pickle is not
            assert not isinstance(exc, tierstore.CorruptBlockError), exc
        assert not marker.exists(), f"a planted pickle ran (readonly={readonly})"
    assert not marker.exists()


def test_the_bomb_is_live() -> None:
    """The planted bytes really do run when unpickled (so the test above can fail)."""
    import pickle
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "m"
        pickle.loads(faultlib.pickle_bomb(marker))
        assert marker.exists()


UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cPickle", "load"),
              ("cPickle", "loads"), ("dill", "load"), ("dill", "loads"), ("marshal", "load"), ("marshal", "loads"),
              ("shelve", "open"), ("joblib", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"),
              ("cloudpickle", "load"), ("cloudpickle", "loads")}


def _problems(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and
                                                    node.module else [])
            if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "shelve", "marshal", "cloudpickle")
                   for n in names):
                found.append(f"{name}:{node.lineno}: imports an unpickler ({', '.join(names)})")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        attr = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        if (owner, attr) in UNPICKLERS:
            found.append(f"{name}:{node.lineno}: {owner}.{attr}()")
        elif attr == "load" and owner == "torch":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{name}:{node.lineno}: torch.load() without weights_only=True")
        elif attr == "load" and owner in ("np", "numpy"):
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{name}:{node.lineno}: numpy.load(allow_pickle=...)")
    return found


def test_package_source_never_unpickles() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 20
    problems = [p for f in files for p in _problems(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE)))]
    assert not problems, problems


def test_source_check_finds_unpicklers() -> None:
    """The checker itself flags each way in."""
    bad = {
        "import pickle": 1, "from pickle import loads": 1, "torch.load(f)": 1, "torch.load(f, weights_only=False)": 1,
        "np.load(f, allow_pickle=True)": 1, "pickle.loads(b)": 1, "pd.read_pickle(f)": 1,
    }
    for source, count in bad.items():
        assert len(_problems(source, "x")) == count, source
    for source in ("torch.load(f, weights_only=True)", "np.load(f)", "json.loads(s)", "np.load(f, allow_pickle=False)"):
        assert _problems(source, "x") == [], source
