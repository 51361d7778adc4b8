"""`raft-sqlite snapshot list/show/export/verify`: read-only views of the snapshots of a real store."""

import hashlib
import json
import os
import subprocess
import sys
import zlib

import apsw
import pytest
from click.testing import CliRunner

from raft_sqlite import LogEntry, SegmentPolicy
from raft_sqlite.cli import cli as cli_group
from raft_sqlite.snapshot import manifest_crc
from tests.conftest import ROOT, open_store

ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="200")
RAW = b"raw snapshot bytes " * 150_000  # 2.7 MiB: 3 chunks of 1 MiB


class KV:
    """A structure with deltas (what changed since the last snapshot/delta)."""

    def __init__(self):
        self.d, self.changed = {}, {}

    def snapshot(self):
        self.changed = {}
        return json.dumps(self.d, sort_keys=True).encode()

    def restore(self, data):
        self.d, self.changed = json.loads(data), {}

    def delta(self):
        out, self.changed = json.dumps(self.changed, sort_keys=True).encode(), {}
        return out

    def apply_delta(self, data):
        self.d.update(json.loads(data))


def make_store(path):
    """Group g1: a state-machine chain FULL@50 -> DELTA@100 -> DELTA@150 (structures kv, sessions), log
    compacted to 100. Group g2: one raw FULL snapshot at 40 (3 chunks). Snapshot ids 1, 2, 3 and 4."""
    with open_store(path, segment_policy=SegmentPolicy(max_entries=25)) as s:
        kv, sessions = KV(), KV()
        sm = s.state_machine("g1")
        sm.register("kv", kv)
        sm.register("sessions", sessions)
        for i in range(1, 151):
            s.log("g1").append([LogEntry(i, 1 + i // 100, b"set k%d" % i)])
            kv.d[f"k{i % 10}"] = kv.changed[f"k{i % 10}"] = i
            if i % 50 == 0:
                s.metadata("g1").set_commit_index(i)
                sm.capture(i, s.log("g1").term(i))
        s.log("g1").compact(100)
        s.log("g2").append([LogEntry(i, 1, b"raw-%d" % i) for i in range(1, 41)])
        s.metadata("g2").set_commit_index(40)
        with s.snapshots("g2").write(40, 1) as w:
            w.write(RAW)
    return path


def run(*args):
    r = CliRunner().invoke(cli_group, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in r.output, r.output
    return r


@pytest.fixture
def node(tmp_path):
    return make_store(tmp_path / "n")


def test_help_lists_the_snapshot_commands():
    r = run("--help")
    assert "snapshot" in r.stdout
    r = run("snapshot", "--help")
    for cmd in ("list", "show", "export", "verify"):
        assert cmd in r.stdout
        assert run("snapshot", cmd, "--help").exit_code == 0


def test_list_shows_chains_base_first_per_group(node):
    r = run("snapshot", "list", node, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    g1, g2 = doc["groups"]
    assert g1["group"] == "g1" and len(g1["chains"]) == 1
    chain = g1["chains"][0]
    assert chain["complete"] and (chain["base_id"], chain["head_id"], chain["length"]) == (1, 3, 3)
    assert [(m["id"], m["index"], m["kind"], m["parent_id"]) for m in chain["snapshots"]] == [
        (1, 50, "FULL", None), (2, 100, "DELTA", 1), (3, 150, "DELTA", 2)]
    assert all(m["state_machine"] and [e["name"] for e in m["structures"]] == ["kv", "sessions"]
               for m in chain["snapshots"])
    raw = g2["chains"][0]["snapshots"][0]
    assert (raw["id"], raw["size"], raw["chunk_count"], raw["state_machine"], raw["status"]) == (
        4, len(RAW), 3, False, "DURABLE")
    assert raw["sha256"] == hashlib.sha256(RAW).hexdigest() and raw["created_at"] > 0
    only = json.loads(run("snapshot", "list", node, "-g", "g2", "--json").stdout)
    assert [g["group"] for g in only["groups"]] == ["g2"]
    text = run("snapshot", "list", node).stdout
    assert "└ 3" in text and "├ 2" in text and "2: kv, sessions" in text
    assert "4 snapshot(s) in 2 chain(s), 2 group(s)" in text


def test_show_manifest_chain_and_structures(node):
    doc = json.loads(run("snapshot", "show", node, "3", "--json").stdout)
    assert doc["snapshot"]["id"] == 3 and doc["snapshot"]["kind"] == "DELTA" and doc["chain_error"] is None
    assert [m["id"] for m in doc["chain"]] == [1, 2, 3]
    st = doc["snapshot"]["structures"]
    assert [(e["name"], e["mode"]) for e in st] == [("kv", "delta"), ("sessions", "delta")]
    assert st[0]["offset"] == 0 and st[1]["offset"] == st[0]["length"] and len(st[0]["sha256"]) == 64
    text = run("snapshot", "show", node, "3").stdout
    assert "#1 FULL@50 -> #2 DELTA@100 -> #3 DELTA@150" in text and "structures" in text and "sessions" in text
    raw = json.loads(run("snapshot", "show", node, "4", "-g", "g2", "--json").stdout)
    assert raw["snapshot"]["structures"] is None and [m["id"] for m in raw["chain"]] == [4]
    assert "no (raw bytes)" in run("snapshot", "show", node, "4").stdout


@pytest.mark.parametrize("args", [("show", "99"), ("show", "4", "-g", "g1"), ("show", "1", "-g", "nope"),
                                  ("list", "-g", "nope"), ("export", "99", "out.bin"), ("verify", "99")])
def test_unknown_snapshot_or_group_is_exit_3(node, args):
    r = run("snapshot", args[0], node, *args[1:])
    assert r.exit_code == 3, r.output
    assert "error:" in r.output


def test_missing_data_dir_is_exit_3(tmp_path):
    for cmd in (("list",), ("show", "1"), ("verify",), ("export", "1", tmp_path / "f")):
        r = subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "snapshot", cmd[0], str(tmp_path / "nope"),
                            *map(str, cmd[1:])], capture_output=True, text=True, env=ENV, timeout=60)
        assert r.returncode == 3 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_export_to_a_file_and_to_stdout(node, tmp_path):
    dest = tmp_path / "out" / "snap4.bin"
    dest.parent.mkdir()
    r = run("snapshot", "export", node, "4", dest, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert dest.read_bytes() == RAW and doc["size"] == len(RAW) and doc["sha256"] == hashlib.sha256(RAW).hexdigest()
    assert sorted(os.listdir(dest.parent)) == ["snap4.bin"]  # no temporary file left
    r = run("snapshot", "export", node, "4", "-")
    assert r.exit_code == 0 and r.stdout_bytes == RAW
    # a state-machine snapshot: the stream is the structures then the table trailer, as written
    with open_store(node) as s:
        m = next(m for m in s.snapshots("g1").list() if m.id == 2)
        with s.snapshots("g1").open(m) as rd:
            expected = rd.read()
    r = subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "snapshot", "export", str(node), "2", "-"],
                       capture_output=True, env=ENV, timeout=60)
    assert r.returncode == 0 and r.stdout == expected and b"exported snapshot 2" in r.stderr
    r = run("snapshot", "export", node, "4", tmp_path / "no-such-dir" / "f.bin")
    assert r.exit_code == 2 and "cannot write" in r.output
    r = run("snapshot", "export", node, "4", "-", "--json")
    assert r.exit_code == 2


def _corrupt_chunk(node, sid, seq=1, fix_crc=False):
    c = apsw.Connection(str(node / "chunks.db"))
    data = bytearray(c.execute("SELECT data FROM snapshot_chunks WHERE snapshot_id=? AND seq=?",
                               (sid, seq)).fetchone()[0])
    data[10] ^= 0xFF
    crc = "crc32" if not fix_crc else zlib.crc32(bytes(data))
    c.execute(f"UPDATE snapshot_chunks SET data=?, crc32={crc} WHERE snapshot_id=? AND seq=?", (bytes(data), sid, seq))
    c.close()
    return bytes(data)


def test_export_of_a_damaged_snapshot_leaves_nothing_behind(node, tmp_path):
    dest = tmp_path / "keep.bin"
    dest.write_bytes(b"previous contents")
    _corrupt_chunk(node, 4, seq=1)
    r = run("snapshot", "export", node, "4", dest)
    assert r.exit_code == 4, r.output
    assert "chunk 1 fails its CRC32 check" in r.output
    assert dest.read_bytes() == b"previous contents" and sorted(os.listdir(tmp_path)) == ["keep.bin", "n"]


def test_verify_clean_store(node):
    r = run("snapshot", "verify", node, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["checked"] == 4 and doc["problems"] == 0
    assert [(s["snapshot_id"], s["state_machine"]) for s in doc["snapshots"]] == [
        (1, True), (2, True), (3, True), (4, False)]
    assert json.loads(run("snapshot", "verify", node, "2", "--json").stdout)["checked"] == 1
    assert json.loads(run("snapshot", "verify", node, "-g", "g2", "--json").stdout)["checked"] == 1
    assert "snapshot verify OK: 4 snapshot(s)" in run("snapshot", "verify", node).stdout


def test_verify_reports_a_bad_chunk_exit_1(node):
    _corrupt_chunk(node, 4, seq=2)
    r = run("snapshot", "verify", node, "--json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    bad = [s for s in doc["snapshots"] if not s["ok"]]
    assert [s["snapshot_id"] for s in bad] == [4] and bad[0]["problems"][0]["kind"] == "chunks"
    r = run("snapshot", "verify", node)
    assert r.exit_code == 1 and "FAILED: 1 of 4" in r.stdout and "chunk 2 fails its CRC32" in r.stdout


def _rewrite_manifest(node, sid, **cols):
    """Set manifest columns and the CRC32 that goes with them (as a writer would have)."""
    c = apsw.Connection(str(node / "raft.db"))
    for k, v in cols.items():
        c.execute(f"UPDATE snapshots SET {k}=? WHERE snapshot_id=?", (v, sid))
    c.execute("UPDATE snapshots SET crc32=? WHERE snapshot_id=?", (manifest_crc(c, sid), sid))
    c.close()


def test_verify_checks_each_structure_and_the_chain(node):
    # structure 'kv' of snapshot 1 damaged with every checksum but its own made to match: only the
    # structures table can tell
    c = apsw.Connection(str(node / "chunks.db"))
    (blob,) = c.execute("SELECT data FROM snapshot_chunks WHERE snapshot_id=1 AND seq=0").fetchone()
    c.close()
    data = _corrupt_chunk(node, 1, seq=0, fix_crc=True)
    assert data != blob
    _rewrite_manifest(node, 1, checksum=hashlib.sha256(data).hexdigest())
    # snapshot 3 names a parent that does not exist
    _rewrite_manifest(node, 3, parent_id=77)
    doc = json.loads(run("snapshot", "verify", node, "--json").stdout)
    probs = {s["snapshot_id"]: [(p["kind"], p["message"]) for p in s["problems"]] for s in doc["snapshots"]}
    assert probs[1] and probs[1][0][0] == "structures" and "'kv' fails its sha256" in probs[1][0][1]
    assert probs[3] and probs[3][0][0] == "chain" and "parent 77" in probs[3][0][1]
    assert not probs[2] and not probs[4]
    assert "BROKEN" in run("snapshot", "show", node, "3").stdout


def test_a_manifest_failing_its_crc(node):
    c = apsw.Connection(str(node / "raft.db"))
    c.execute("UPDATE snapshots SET size = size + 1 WHERE snapshot_id = 4")
    c.close()
    r = run("snapshot", "verify", node, "--json")
    assert r.exit_code == 1
    (s,) = [s for s in json.loads(r.stdout)["snapshots"] if not s["ok"]]
    assert s["snapshot_id"] == 4 and s["problems"][0]["kind"] == "manifest"
    r = run("snapshot", "show", node, "4")
    assert r.exit_code == 4 and "fails its CRC check" in r.output


def _digests(d):
    return {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in sorted(os.listdir(d))
            if not n.endswith("-shm")}


def test_read_only_beside_a_running_node(node, tmp_path):
    before = _digests(node)
    for args in (("list",), ("show", "3"), ("verify",), ("export", "4", tmp_path / "x.bin")):
        assert run("snapshot", args[0], node, *args[1:]).exit_code == 0
    assert _digests(node) == before  # a stopped store: not one byte written (no WAL, no checkpoint)
    with open_store(node) as s:  # the node runs in this process, holding the data_dir lock
        s.log("g2").append([LogEntry(41, 1, b"more")])
        for args in (("list",), ("show", "3"), ("verify",)):
            r = subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "snapshot", args[0], str(node), *args[1:],
                                "--json"], capture_output=True, text=True, env=ENV, timeout=60)
            assert r.returncode == 0, r.stderr
        r = subprocess.run([sys.executable, "-m", "raft_sqlite.cli", "snapshot", "export", str(node), "4", "-"],
                           capture_output=True, env=ENV, timeout=60)
        assert r.returncode == 0 and r.stdout == RAW
        s.log("g2").append([LogEntry(42, 1, b"still writable")])  # the node was never blocked


def test_a_snapshot_being_received_is_listed_as_writing(tmp_path):
    d = tmp_path / "w"
    with open_store(d) as s:
        s.log("g").append([LogEntry(i, 1, b"x") for i in range(1, 11)])
        w = s.snapshots("g").install(50, 2)
        w.begin()
        try:
            w.write(b"y" * 3000)
            w.flush()  # durable: what a resume would start from
            doc = json.loads(run("snapshot", "list", d, "--json").stdout)
            (g,) = doc["groups"]
            assert g["chains"] == [] and [(m["id"], m["status"], m["source"], m["size"], m["chunk_count"])
                                          for m in g["writing"]] == [(1, "WRITING", "install", 3000, 1)]
            assert "WRITING" in run("snapshot", "list", d).stdout
            for args in (("export", "1", tmp_path / "f.bin"), ("verify", "1")):
                r = run("snapshot", args[0], d, *args[1:])
                assert r.exit_code == 3 and "WRITING" in r.output
            assert not (tmp_path / "f.bin").exists()
        finally:
            w.abort()
