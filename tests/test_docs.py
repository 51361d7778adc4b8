"""Every code block of README.md and docs/*.md that claims to run is run.

How a block declares itself: an HTML comment on the line(s) just above its fence.

* ```` ```python ```` blocks MUST carry one of
  ``<!-- runs -->`` / ``<!-- runs: prelude=NAME -->`` (run as written, in a fresh subprocess whose
  working directory is an empty temp dir, after the prelude NAME below; default ``objects``; exit 0
  required) or ``<!-- illustrative: why -->`` (not run, and the reason is said). A plain fence marked
  ``<!-- output -->`` right after a running block is its expected stdout (compared exactly).
* ```` ```sql ```` blocks marked ``<!-- runs: sql -->`` are executed statement by statement against a
  populated store's ``raft.db`` (read-only); ``<!-- illustrative: why -->`` otherwise.
* ```` ```sh ```` blocks carry ``<!-- demo-command -->`` / ``<!-- test-command -->`` (CI runs those:
  .ci/run) or ``<!-- illustrative: why -->``.
* Plain fences (output, layouts, CLI synopses) claim nothing and are not run.

A block without its marker fails ``test_every_code_block_declares_itself``.
"""

import os
import re
import textwrap

import apsw
import pytest
from conftest import ROOT, open_store, run_py

from raft_sqlite import LogEntry

DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARK = re.compile(r"^<!--\s*([\w-]+)\s*(?::\s*(.*?))?\s*-->\s*$")


def blocks(doc):
    """(doc, line, lang, marker, arg, code, output) of every fenced block of ``doc``."""
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        lines = f.read().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mk = _MARK.match(lines[k].strip()) if k >= 0 and k >= start - 2 else None
        out.append({"doc": doc, "line": start + 1, "lang": lang, "marker": mk and mk.group(1),
                    "arg": (mk and mk.group(2)) or "", "code": "\n".join(lines[start + 1:j]) + "\n"})
        i = j + 1
    for a, b in zip(out, out[1:]):  # an <!-- output --> fence belongs to the block before it
        if b["marker"] == "output" and b["lang"] == "":
            a["output"] = b["code"]
    return out


ALL = [b for d in DOCS for b in blocks(d)]
ALLOWED = {"python": {"runs", "illustrative"}, "sql": {"runs", "illustrative"},
           "sh": {"demo-command", "test-command", "illustrative"}}


def test_every_code_block_declares_itself():
    bad = [f"{b['doc']}:{b['line']}: ```{b['lang']} block marked {b['marker']!r}" for b in ALL
           if b["lang"] in ALLOWED and (b["marker"] not in ALLOWED[b["lang"]]
                                        or (b["marker"] == "illustrative" and not b["arg"]))]
    assert not bad, "code blocks without a <!-- runs --> / <!-- illustrative: why --> marker:\n" + "\n".join(bad)
    assert any(b["marker"] == "runs" for b in ALL)


# ---------------------------------------------------------------------------------------------- preludes
#: Names the documented snippets take for granted, defined before the block runs.
PRELUDES = {}
PRELUDES["objects"] = '''
import json, logging, os
from raft_sqlite import NodeStore, LogEntry

class _SM:
    """my_state_machine: applies log entries, dumps/loads itself in pieces."""
    def __init__(self):
        self.d = {}
    def apply(self, e):
        self.d[e.index] = bytes(e.data)
    def dump_in_pieces(self):
        raw = json.dumps({str(k): v.hex() for k, v in self.d.items()}).encode()
        return [raw[i:i + 1000] for i in range(0, len(raw), 1000)] or [b"{}"]
    def load_from(self, r):
        self.d = {int(k): bytes.fromhex(v) for k, v in json.loads(r.read()).items()}

class _Struct:
    """A registered structure (kv, sessions): snapshot()/restore()."""
    def __init__(self):
        self.d = {}
    def snapshot(self):
        return json.dumps(self.d).encode()
    def restore(self, data):
        self.d = json.loads(data)

class _App:
    applied = 20

my_state_machine, kv, sessions, app = _SM(), _Struct(), _Struct(), _App()
applied = 20
index, term = 40, 2  # an InstallSnapshot from a leader, beyond everything local

def chunks_from_leader():
    for i in range(3):
        yield b"leader-chunk-%d " % i * 500
'''
PRELUDES["node"] = PRELUDES["objects"] + '''
with NodeStore.open("data/n1", "n1", cluster_id="c1") as _s:  # node n1 of cluster c1: group g, 20 committed
    _s.log("g").append([LogEntry(i, 1, b"cmd-%d" % i) for i in range(1, 21)])
    _s.metadata("g").set_commit_index(20)
    for _e in _s.log("g").entries(1, 21):
        my_state_machine.apply(_e)
'''
PRELUDES["store"] = PRELUDES["node"] + '''
store = NodeStore.open("data/n1", "n1", cluster_id="c1")
log = store.log("g")
'''
PRELUDES["none"] = ""  # a block that stands alone, as a reader copies it
EPILOGUE = '''
for _name in ("sched",):
    if _name in globals():
        globals()[_name].stop()
if "store" in globals():
    store.close()
'''


def _id(b):
    return f"{b['doc']}:{b['line']}"


RUN_PY = [b for b in ALL if b["lang"] == "python" and b["marker"] == "runs"]


@pytest.mark.parametrize("block", RUN_PY, ids=[_id(b) for b in RUN_PY])
def test_python_block_runs(block, tmp_path):
    m = re.fullmatch(r"(?:prelude=(\w+))?", block["arg"].strip())
    assert m, f"{_id(block)}: bad runs marker argument {block['arg']!r}"
    absolute = re.findall(r"""["'](/[^"']*)["']""", block["code"])
    assert not absolute, f"{_id(block)}: absolute paths {absolute}: a runnable block works in its own directory"
    prelude = PRELUDES[m.group(1) or "objects"]
    code = prelude + "\n# ---- the documented block, verbatim ----\n" + block["code"] + EPILOGUE
    r = run_py(code, cwd=tmp_path, timeout=180)
    assert r.returncode == 0, f"{_id(block)} failed:\n{textwrap.indent(r.stderr[-4000:], '    ')}"
    if "output" in block:
        assert r.stdout.strip() == block["output"].strip(), f"{_id(block)} printed something else"


RUN_SQL = [b for b in ALL if b["lang"] == "sql" and b["marker"] == "runs"]


@pytest.mark.parametrize("block", RUN_SQL, ids=[_id(b) for b in RUN_SQL])
def test_sql_block_runs(block, tmp_path):
    d = tmp_path / "node"
    with open_store(d) as s:
        for g in ("g0", "g1"):
            s.log(g).append([LogEntry(i, 1, b"x" * i) for i in range(1, 31)])
            s.metadata(g).set_commit_index(25)
        with s.snapshots("g0").write(20, 1) as w:
            w.write(b"state")
        s.log("g0").compact(10)
    c = apsw.Connection(f"file:{d / 'raft.db'}?mode=ro", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    try:
        rows = list(c.execute(block["code"]))
    finally:
        c.close()
    assert rows, f"{_id(block)}: the queries returned nothing on a populated store"


# ---------------------------------------------------------------------------------------------- drift
def _readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_exit_codes_are_the_clis():
    from raft_sqlite.cli import EXIT_CODES

    for doc in ("README.md", os.path.join("docs", "operations.md")):
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            table = f.read().split("| exit code | meaning |", 1)[1].split("\n\n", 1)[0]
        rows = dict(re.findall(r"^\| (\d) \| (.+?) \|$", table, re.M))
        assert {int(k): v.replace("`", "") for k, v in rows.items()} == EXIT_CODES, doc


def test_readme_logging_table_names_every_logger():
    import glob

    names = set()
    for path in glob.glob(os.path.join(ROOT, "raft_sqlite", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            names |= set(re.findall(r'getLogger\("(raft_sqlite[\w.]*)"\)', f.read()))
    section = _readme().split("### Logging", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(raft_sqlite[\w.]*)` \|", section, re.M))
    assert names and names == documented, (sorted(names - documented), sorted(documented - names))


def test_readme_status_example_shows_the_current_schema():
    from raft_sqlite import layout

    shown = re.findall(r"^format / schema\s+\d+ / (\S+)$", _readme(), re.M)
    assert shown and set(shown) == {layout.MAIN_HEAD}


def test_every_operations_transcript_has_its_generator():
    # README's CLI transcripts are pasted by scripts/ops_tour.py; a marker without a generator (or the
    # reverse) would be an example nobody can re-run
    import importlib.util

    spec = importlib.util.spec_from_file_location("ops_tour", os.path.join(ROOT, "scripts", "ops_tour.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = _readme()
    names = mod.transcripts("/tmp/ops")
    assert sorted(re.findall(r"^<!-- transcript:([\w-]+) -->$", readme, re.M)) == sorted(names)
    assert mod.splice(readme, {n: "x\n" for n in names}).count("```\nx\n```") == len(names)
