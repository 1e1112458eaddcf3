"""Every Python package of the tree is installed by pyproject.toml (an editable install finds a
missing one through the epkern path, so only a wheel would show the gap)."""
import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = {"epkern": "epkern", "codegen": "epkern.codegen", "solver": "epkern.solver", "hooks": "epkern.hooks",
           "templates": "epkern.templates"}


def test_every_package_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = config.get("package-data", {})
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name,) + rel))
    # folders shipped as package data of their parent (the deep_ep stand-in) are not packages of ours
    shipped_as_data = {p for p in found if any(p.startswith(parent + ".") and any("/" in pat for pat in pats)
                                                   for parent, pats in data.items())}
    assert sorted(found - shipped_as_data - set(config["packages"])) == []
