"""The PySyncObj adapter's own file (``fullDumpFile``) goes through :mod:`raft_sqlite.fsio`, the file-system
seam, like every other file raft_sqlite writes outside SQLite: a test backend sees its open, writes and
replace (so the power-loss model of tests/support/faultvfs.py covers it too)."""

from __future__ import annotations

import os
import pickle
import time

import pytest

pysyncobj = pytest.importorskip("pysyncobj")

from pysyncobj import SyncObjConf  # noqa: E402 (after importorskip)

from raft_sqlite import fsio  # noqa: E402 (after importorskip)
from raft_sqlite.integrations.pysyncobj import (  # noqa: E402 (after importorskip)
    DUMP_FILE_NAME,
    patch_pysyncobj,
)
from tests.support.net import free_addr  # noqa: E402
from tests.support.pso import Counter  # noqa: E402 (after importorskip)


@pytest.fixture(autouse=True)
def _fsync_off(monkeypatch):
    monkeypatch.setenv("RAFT_SQLITE_FSYNC", "OFF")  # the store's durability is not what these tests check


class Recorder(fsio.OsFileSystem):
    """The real file system, recording every open/read/write/replace made through the seam."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.paths: dict[int, str] = {}  # fd -> path

    def open(self, path, flags, mode=0o600):
        fd = super().open(path, flags, mode)
        self.paths[fd] = path
        self.calls.append(("open", path, flags))
        return fd

    def read(self, fd, n):
        data = super().read(fd, n)
        self.calls.append(("read", self.paths.get(fd), len(data)))
        return data

    def write(self, fd, data):
        n = super().write(fd, data)
        self.calls.append(("write", self.paths.get(fd), bytes(memoryview(data)[:n])))
        return n

    def replace(self, src, dst):
        super().replace(src, dst)
        self.calls.append(("replace", src, dst))

    def written(self, path: str) -> bytes:
        return b"".join(c[2] for c in self.calls if c[0] == "write" and c[1] == path)


def _tick_until(o, cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        o.doTick(0.01)
        if cond():
            return True
    return False


def _compacted_node(path, **kw):
    """A single node with 10 commands applied and its log compacted (a durable store snapshot), destroyed."""
    o = Counter(free_addr(), SyncObjConf(autoTick=False, journalFile=str(path), **kw))
    assert _tick_until(o, o._isReady)
    for i in range(1, 11):
        o.add(i)
    assert _tick_until(o, lambda: o.value() == 55)
    o._forceLogCompaction()
    assert _tick_until(o, lambda: len(o._SyncObj__raftLog) <= 3)
    return o


def test_materialized_dump_is_written_through_fsio(tmp_path):
    path = tmp_path / "solo"
    dump, tmp = str(path / DUMP_FILE_NAME), str(path / DUMP_FILE_NAME) + ".rsql.tmp"
    with patch_pysyncobj():
        _compacted_node(path)._destroy()
        rec = Recorder()
        with fsio.installed(rec):
            # the Serializer SyncObj builds materializes the dump
            o = Counter(free_addr(), SyncObjConf(autoTick=False, journalFile=str(path)))
        try:
            assert _tick_until(o, lambda: o.value() == 55)  # ... which SyncObj loaded
        finally:
            o._destroy()
    opens = [c for c in rec.calls if c[0] == "open" and c[1] == tmp]
    assert len(opens) == 1 and opens[0][2] & os.O_CREAT and opens[0][2] & os.O_TRUNC
    assert ("replace", tmp, dump) in rec.calls
    with open(dump, "rb") as f:
        content = f.read()
    assert content and rec.written(tmp) == content  # every byte of the file went through the seam


def _custom_serializer(file_name, data):
    with open(file_name, "wb") as f:  # the user's code: not raft_sqlite's file operation
        pickle.dump(data, f)


def _custom_deserializer(file_name):
    with open(file_name, "rb") as f:
        return pickle.load(f)


def test_custom_serializer_dump_is_read_and_replaced_through_fsio(tmp_path):
    path = tmp_path / "solo"
    dump = str(path / DUMP_FILE_NAME)
    rec = Recorder()
    with patch_pysyncobj(), fsio.installed(rec):
        o = _compacted_node(path, serializer=_custom_serializer, deserializer=_custom_deserializer)
        o._destroy()
    tmp = dump + ".tmp"
    assert ("open", tmp, os.O_RDONLY) in rec.calls
    assert sum(c[2] for c in rec.calls if c[0] == "read" and c[1] == tmp) == os.path.getsize(dump)
    assert ("replace", tmp, dump) in rec.calls
