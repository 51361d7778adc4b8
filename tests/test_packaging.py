"""Packaging a user can trust: license, metadata, one version, and a plain `pip install .` that runs."""

import os
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT

import raft_sqlite


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_license_file_and_metadata():
    p = pyproject()
    assert p["license"] == "MIT" and p["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        assert f.read().startswith("MIT License")
    classifiers = set(p["classifiers"])
    assert "Operating System :: POSIX :: Linux" in classifiers and "Typing :: Typed" in classifiers
    assert f"Programming Language :: Python :: {p['requires-python'].lstrip('>=')}" in classifiers


def test_version_has_one_source():
    p = pyproject()
    assert "version" not in p and p["dynamic"] == ["version"]
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        dyn = tomllib.load(f)["tool"]["setuptools"]["dynamic"]["version"]
    assert dyn == {"attr": "raft_sqlite.version.__version__"}
    from raft_sqlite.version import __version__

    assert raft_sqlite.__version__ == __version__
    r = subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "--version"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert r.stdout.strip() == f"raft-sqlite, version {__version__}", r.stdout + r.stderr


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_runs_the_demo(tmp_path):
    # what README's demo command does, from this checkout: no extras, then the demo (SIGKILL, reopen, check)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", ROOT], capture_output=True, text=True,
                         timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    exe = str(venv / "bin" / "raft-sqlite")
    demo = subprocess.run([exe, "demo", "--data-dir", str(tmp_path / "node")], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert demo.returncode == 0 and "survived SIGKILL intact" in demo.stdout, demo.stdout + demo.stderr
    meta = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import importlib.metadata as m; d = m.metadata('raft_sqlite'); "
                           "print(d['Version'], d['License-Expression'])"], capture_output=True, text=True, timeout=60)
    assert meta.stdout.split() == [raft_sqlite.__version__, "MIT"], meta.stdout + meta.stderr
