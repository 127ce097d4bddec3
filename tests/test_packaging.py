"""The distribution ships every subpackage and the schema files (a wheel built from pyproject's list)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setuptools() -> dict[str, object]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    section: dict[str, object] = config["tool"]["setuptools"]
    return section


def test_every_subpackage_is_listed() -> None:
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tierstore").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    listed = set(_setuptools()["packages"])  # type: ignore[call-overload]
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == {"tierstore._schema"}


def test_schema_files_are_package_data() -> None:
    section = _setuptools()
    assert section["package-dir"] == {"tierstore._schema": "schema"}
    assert section["package-data"]["tierstore._schema"] == ["*.sql"]  # type: ignore[index]
    assert sorted(p.name for p in (ROOT / "schema").glob("*.sql"))
