"""`raft-sqlite log`: payload preview length, decoder hook, term/kind filters, hints, --follow."""

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from raft_sqlite import EntryKind, LogEntry, SegmentPolicy
from raft_sqlite.cli import cli as cli_group
from raft_sqlite.cli import log_hint
from tests.conftest import ROOT, open_store

ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="200")

DECODER = '''
import json

def decode(entry):
    if entry.index == 13:
        raise ValueError("cannot decode thirteen")
    return f"{entry.kind.name} #{entry.index}/t{entry.term}: {entry.data.decode()}"

NOT_CALLABLE = 3
'''


def make_store(path):
    """Group a: 60 entries (term 1 for 1..29, term 2 after; every 10th a CONFIG), a snapshot at 40, log
    compacted to 40. Group empty: none. Group cut: 10 entries, compacted to 10 (an empty log)."""
    with open_store(path, segment_policy=SegmentPolicy(max_entries=10)) as s:
        s.log("a").append([LogEntry(i, 1 if i < 30 else 2, b"cmd %d" % i,
                                    EntryKind.CONFIG if i % 10 == 0 else EntryKind.NORMAL) for i in range(1, 61)])
        s.metadata("a").set_commit_index(60)
        with s.snapshots("a").write(40, 2) as w:
            w.write(b"state")
        s.log("a").compact(40)
        s.metadata("empty").set_commit_index(0)
        s.log("cut").append([LogEntry(i, 1, b"x") for i in range(1, 11)])
        s.metadata("cut").set_commit_index(10)
        with s.snapshots("cut").write(10, 1) as w:
            w.write(b"state")
        s.log("cut").compact(10)
    return path


@pytest.fixture
def node(tmp_path):
    return make_store(tmp_path / "n")


def run(*args):
    r = CliRunner().invoke(cli_group, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in r.output, r.output
    return r


def entries(*args):
    r = run("log", *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_payload_bytes(node):
    doc = entries(node, "-g", "a", "--limit", "1", "--payload-bytes", "3")
    assert doc["entries"][0]["payload_prefix"] == b"cmd".hex()
    assert entries(node, "-g", "a", "--limit", "1", "--payload-bytes", "0")["entries"][0]["payload_prefix"] == ""
    assert entries(node, "-g", "a", "--limit", "1")["entries"][0]["payload_prefix"] == b"cmd 60".hex()
    text = run("log", node, "-g", "a", "--limit", "1", "--payload-bytes", "2").stdout
    assert b"cm".hex() + "..." in text
    assert run("log", node, "-g", "a", "--payload-bytes", "-1").exit_code == 2


def test_term_and_kind_filters(node):
    doc = entries(node, "-g", "a", "--kind", "config")
    assert [e["index"] for e in doc["entries"]] == [50, 60] and doc["filters"]["kind"] == "CONFIG"
    doc = entries(node, "-g", "a", "--term", "2", "--limit", "3")
    assert [e["index"] for e in doc["entries"]] == [58, 59, 60]
    doc = entries(node, "-g", "a", "--term", "2", "--from", "41", "--limit", "3")
    assert [e["index"] for e in doc["entries"]] == [41, 42, 43]
    doc = entries(node, "-g", "a", "--term", "7")
    assert doc["entries"] == [] and "matches term 7" in doc["hint"]
    assert run("log", node, "-g", "a", "--kind", "bogus").exit_code == 2


def test_hints_for_empty_and_compacted_ranges(node):
    doc = entries(node, "-g", "a", "--from", "1", "--to", "20")
    assert doc["entries"] == [] and doc["hint"] == "entries 1..20 were compacted; the log starts at 41"
    doc = entries(node, "-g", "a", "--from", "100", "--to", "120")
    assert doc["entries"] == [] and doc["hint"] == "range 100..120 is past the last index 60"
    assert entries(node, "-g", "empty")["hint"] == "group 'empty' has no entries"
    assert entries(node, "-g", "cut")["hint"] == ("the log of group 'cut' is empty: entries 1..10 were compacted "
                                                  "(snapshot at 10); the next entry will be 11")
    doc = entries(node, "-g", "a", "--from", "35", "--to", "42")
    assert [e["index"] for e in doc["entries"]] == [41, 42]
    assert doc["hint"] == "entries 35..40 were compacted; the log starts at 41"
    assert entries(node, "-g", "a", "--limit", "2")["hint"] is None
    text = run("log", node, "-g", "a", "--from", "1", "--to", "20").stdout
    assert "(entries 1..20 were compacted; the log starts at 41)" in text
    assert log_hint("g", 1, 10, 0, 5, 3, False) == "the range 5..3 is empty"


def test_decoder_hook(node, tmp_path, monkeypatch):
    (tmp_path / "mydecoder.py").write_text(DECODER)
    monkeypatch.chdir(tmp_path)  # found in the current directory, as with `python -m`
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    doc = entries(node, "-g", "a", "--from", "50", "--to", "51", "--decoder", "mydecoder:decode")
    assert [e["decoded"] for e in doc["entries"]] == ["CONFIG #50/t2: cmd 50", "NORMAL #51/t2: cmd 51"]
    assert all(e["decode_error"] is None for e in doc["entries"])
    text = run("log", node, "-g", "a", "--from", "50", "--to", "50", "--decoder", "mydecoder:decode").stdout
    assert "decoded" in text and "CONFIG #50/t2: cmd 50" in text


def test_decoder_failing_on_one_entry_marks_that_entry(tmp_path, monkeypatch):
    (tmp_path / "mydecoder2.py").write_text(DECODER)
    d = tmp_path / "n2"
    with open_store(d) as s:
        s.log("g").append([LogEntry(i, 1, b"c%d" % i) for i in range(1, 16)])
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = entries(d, "--from", "12", "--to", "14", "--decoder", "mydecoder2:decode")
    assert [e["decoded"] for e in doc["entries"]] == ["NORMAL #12/t1: c12", None, "NORMAL #14/t1: c14"]
    assert doc["entries"][1]["decode_error"] == "ValueError: cannot decode thirteen"
    r = run("log", d, "--from", "13", "--to", "13", "--decoder", "mydecoder2:decode")
    assert r.exit_code == 0 and "<decoder error: ValueError: cannot decode thirteen>" in r.stdout


@pytest.mark.parametrize(("spec", "message"), [
    ("no_such_module_xyz:decode", "cannot import module 'no_such_module_xyz' (ModuleNotFoundError"),
    ("mydecoder3", "is not MODULE:FUNCTION"),
    ("mydecoder3:nope", "module 'mydecoder3' has no attribute 'nope'"),
    ("mydecoder3:NOT_CALLABLE", "is a int, not a callable"),
    ("broken_decoder:decode", "cannot import module 'broken_decoder' (ZeroDivisionError"),
])
def test_decoder_that_cannot_be_loaded_is_a_usage_error(node, tmp_path, monkeypatch, spec, message):
    (tmp_path / "mydecoder3.py").write_text(DECODER)
    (tmp_path / "broken_decoder.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = run("log", node, "-g", "a", "--decoder", spec)
    assert r.exit_code == 2 and message in r.output and "--decoder" in r.output


def _read_lines(proc, want, timeout=20.0):
    """Lines of ``proc``'s stdout until ``want(lines)`` holds (or the timeout)."""
    lines, buf, end = [], b"", time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while time.monotonic() < end and not want(lines):
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines += [x.decode() for x in done]
    return lines


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_follow_prints_new_entries_until_interrupted(tmp_path, sig):
    d = tmp_path / "f"
    with open_store(d) as s:
        s.log("g").append([LogEntry(i, 1, b"e%d" % i) for i in range(1, 6)])
    proc = subprocess.Popen([sys.executable, "-m", "raft_sqlite.cli", "log", str(d), "--follow", "--interval", "0.05",
                             "--limit", "2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl-C, as on a terminal
    try:
        first = _read_lines(proc, lambda ls: len(ls) >= 2)
        assert [json.loads(x)["index"] for x in first] == [4, 5]
        with open_store(d) as s:  # the node appends while the CLI follows (read-only: no lock conflict)
            for i in range(6, 9):
                s.log("g").append([LogEntry(i, 2, b"e%d" % i)])
                time.sleep(0.1)
            more = _read_lines(proc, lambda ls: len(ls) >= 3)
            assert [(json.loads(x)["index"], json.loads(x)["term"]) for x in more] == [(6, 2), (7, 2), (8, 2)]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and out.strip() == b""


def test_follow_table_output_and_usage(node):
    r = run("log", node, "-g", "a", "--follow", "--to", "5")
    assert r.exit_code == 2 and "--to" in r.output
    proc = subprocess.Popen([sys.executable, "-m", "raft_sqlite.cli", "log", str(node), "-g", "a", "--follow",
                             "--interval", "0.05", "--limit", "2", "--decoder", "json:dumps"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        lines = _read_lines(proc, lambda ls: len(ls) >= 4)
        proc.terminate()
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "following" in lines[0] and lines[1].split() == ["index", "term", "kind", "size", "crc32", "crc", "segment",
                                                            "payload", "decoded"]
    assert lines[2].split()[:3] == ["59", "2", "NORMAL"] and lines[3].split()[:3] == ["60", "2", "CONFIG"]
    assert "<decoder error: TypeError" in lines[2]  # json.dumps cannot take a LogEntry's bytes
    assert proc.returncode == 0
