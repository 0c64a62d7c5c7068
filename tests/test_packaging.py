"""The wheel holds every subpackage: pyproject.toml lists each ``biofed.*`` package and maps its folder."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_for_the_wheel():
    with open(ROOT / "pyproject.toml", "rb") as file:
        config = tomllib.load(file)["tool"]["setuptools"]
    listed, folders = set(config["packages"]), config["package-dir"]
    on_disk = {
        ".".join((package, *init.parent.relative_to(ROOT / folder).parts))
        for package, folder in folders.items()
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert "biofed.benchmarks" in on_disk and "biofed.apps" in on_disk
    missing = sorted(on_disk - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml (the wheel lacks them): {missing}"
    stale = sorted(listed - on_disk)
    assert not stale, f"[tool.setuptools] packages lists packages with no folder: {stale}"
