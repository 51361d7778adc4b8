"""benchmarks/sqlstate.py runs end to end at smoke size (every part, --json), and run_all knows it. The
figures of such a run mean nothing; this checks the script, not the speed."""

from __future__ import annotations

import json
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import run_all  # noqa: E402
import sqlstate  # noqa: E402


def test_sqlstate_benchmark_quick_run_prints_every_table_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_DIR", str(tmp_path))
    out = tmp_path / "sqlstate.json"
    md = sqlstate.main(["--quick", "--json", str(out)])
    for heading in ("**Apply throughput.**", "**Restart.**", "**Snapshots of a"):
        assert heading in md
    assert "| 1 | 200 | bare apsw |" in md and "catch_up, deltas=False" in md
    assert "`state.snapshot(kind=FULL)`" in md and "`state.snapshot(kind=DELTA)`" in md
    doc = json.loads(out.read_text())
    assert doc["meta"]["script"] == "benchmarks/sqlstate.py"
    assert set(doc) >= {"apply", "restart", "snapshot"}
    # every row measured, every round recorded; the resumed state really was up to date / behind
    assert len(doc["apply"]["rows"]) == 3 * len(sqlstate.APPLY_KINDS)
    for name, row in doc["restart"]["rows"].items():
        assert row["rounds"] and row["median"]["total"] > 0, name
    snap = doc["snapshot"]["rows"]
    assert snap["FULL snapshot (appends + applies running)"]["median"]["bytes"] > 0
    # the scratch data_dirs are gone
    assert [p.name for p in tmp_path.iterdir()] == ["sqlstate.json"]


def test_sqlstate_benchmark_is_registered_in_run_all_with_its_defaults_spelled_out():
    names = {b[0]: b for b in run_all.BENCHMARKS}
    assert names["sqlstate"][1] == "sqlstate"
    readme_args = names["sqlstate"][3]
    assert vars(sqlstate.parser().parse_args(readme_args)) == vars(sqlstate.parser().parse_args([]))
