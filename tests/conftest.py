"""Shared fixtures. Tests talk only to local files and loopback addresses."""

import os
import subprocess
import sys

import pytest

from raft_sqlite import FsyncMode, NodeStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def open_store(path, node_id="n1", cluster_id="c1", **kw):
    """Open a store with test defaults (fsync OFF unless given: crash tests pick their own mode)."""
    kw.setdefault("fsync", FsyncMode.OFF)
    return NodeStore.open(path, node_id, cluster_id=cluster_id, **kw)


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "node"


@pytest.fixture
def store(data_dir):
    s = open_store(data_dir)
    yield s
    s.close()


def run_py(code: str, *args, timeout=120, **kw):
    """Run ``python -c code`` in a subprocess with the repo importable; returns CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)
