"""The house rules of the code layout: no cross-module private access, no import cycle, every module on the
module map of docs/architecture.md, the package typed (py.typed)."""

import os
import subprocess
import sys
from pathlib import Path

import raft_sqlite

ROOT = Path(__file__).resolve().parent.parent
PKG = Path(raft_sqlite.__file__).resolve().parent


def test_no_private_access_across_modules_and_no_import_cycle():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "coupling.py"), str(PKG)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cross-module private accesses 0, import cycles 0" in r.stdout


def test_the_checker_sees_a_private_access_and_a_cycle(tmp_path):
    """The check above can fail: a package with both defects is reported."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n\n\ndef _hidden():\n    return 1\n")
    (pkg / "b.py").write_text("from . import a\n\n\ndef f():\n    return a._hidden()\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "coupling.py"), str(pkg)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    assert "cross-module private accesses 1, import cycles 1" in r.stdout


def test_every_module_is_on_the_module_map():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG)
        if rel.parts[0] == "migrations" or rel.name == "__init__.py":
            continue
        name = rel.as_posix() if rel.parent.name != "snapshot" else f"{rel.parent.name}/"
        if f"`{name}`" not in text and f"`{rel.stem}`" not in text:
            missing.append(rel.as_posix())
    assert not missing, f"modules missing from docs/architecture.md: {missing}"


def test_package_ships_py_typed():
    assert (PKG / "py.typed").is_file()
    assert os.path.getsize(PKG / "py.typed") == 0
