"""benchmarks/plots.py draws its four PNGs from the benchmarks' --json files (here small synthetic ones
built with the suite's own results_json), and copies the json it used next to them."""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

pytest.importorskip("matplotlib", reason="matplotlib (extra `bench`) is not installed")

import _common  # noqa: E402
import plots  # noqa: E402


def result(name, rounds):
    r = _common.Result(name)
    r.rounds = rounds
    return r


def lat(base, batch=1):
    """One round's figures of a latency row whose samples are ``base`` .. 3 x ``base`` seconds."""
    samples = [base * (1 + 2 * i / 999) for i in range(1000)]
    return {**_common.latency_figures(samples, batch), "q": _common.quantiles(samples)}


def meta(script):
    return _common.run_meta(script, ["--quick"], _common.run_start())


def append_doc():
    res, info = {}, {}
    res["phys"], info["phys"] = result("phys", [lat(1e-4), lat(1.2e-4)]), {"kind": "fsync", "batch": 1}
    for b in (1, 8, 64):
        res[f"apsw b{b}"] = result("a", [lat(1.5e-4 * b ** 0.5, b)] * 2)
        info[f"apsw b{b}"] = {"kind": "apsw", "batch": b}
        for m in ("NORMAL", "FULL"):
            res[f"{m} b{b}"] = result("s", [lat(2e-4 * b ** 0.5, b), lat(2.5e-4 * b ** 0.5, b)])
            info[f"{m} b{b}"] = {"kind": "store", "batch": b, "mode": m}
    return {"meta": meta("benchmarks/append.py"), "args": {"payload": 100, "rounds": 2}, "batch_sizes": [1, 8, 64],
            "modes": ["NORMAL", "FULL"], "quantile_levels": _common.QUANTILE_LEVELS, "row_info": info,
            "rows": _common.results_json(res)}


def recovery_doc():
    res, info = {}, {}
    for n in (1000, 10000):
        for cache in ("warm", "cold"):
            res[f"{n} o {cache}"] = result("o", [{"open": n * 1e-6, "replay": n * 1e-6, "total": n * 2e-6}] * 2)
            info[f"{n} o {cache}"] = {"size": n, "what": "open+replay", "cache": cache}
            res[f"{n} r {cache}"] = result("r", [{"bytes": n * 100, "s": n * 1e-7, "resident": None}] * 2)
            info[f"{n} r {cache}"] = {"size": n, "what": "raw read", "cache": cache}
    return {"meta": meta("benchmarks/recovery.py"), "sizes": [1000, 10000], "payload": 100, "row_info": info,
            "rows": _common.results_json(res)}


def background_doc():
    kinds = ["idle", "snapshot", "checkpoint"]
    summary = {k: {"p50": 1e-4, "p99": 3e-4 * (i + 1), "max": 1e-3, "p99_vs_idle": i + 1.0, "raw_p99": 2e-4,
                   "raw_max": 1e-3, "raw_p99_vs_idle": 1.0} for i, k in enumerate(kinds)}
    return {"meta": meta("benchmarks/background.py"), "kinds": kinds, "summary": summary, "rows": {}}


def test_plots_from_json_writes_every_png_and_copies_the_json(tmp_path):
    src, out = tmp_path / "json", tmp_path / "out"
    src.mkdir()
    for name, doc in (("append", append_doc()), ("recovery", recovery_doc()), ("background", background_doc())):
        _common.write_json(str(src / f"{name}.json"), doc)
    paths = plots.main(["--from-json", str(src), "--out", str(out), "--quick"])
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(p for ps in plots.PLOTS.values() for p in ps)
    for p in paths:
        with open(p, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) > 10_000
    for name in ("append", "recovery", "background"):
        with open(out / f"{name}.json") as f:
            assert json.load(f)["meta"]["script"] == f"benchmarks/{name}.py"


def test_plots_only_and_missing_json(tmp_path):
    _common.write_json(str(tmp_path / "recovery.json"), recovery_doc())
    paths = plots.main(["--from-json", str(tmp_path), "--out", str(tmp_path), "--only", "recovery"])
    assert [os.path.basename(p) for p in paths] == ["recovery_time.png"]
    with pytest.raises(SystemExit):
        plots.main(["--from-json", str(tmp_path), "--out", str(tmp_path), "--only", "append"])


def test_caption_names_date_commit_command_and_caveat():
    doc = {"meta": {"script": "benchmarks/append.py", "argv": ["--rounds", "3", "--json", "/tmp/x.json"],
                    "date": "2026-12-03 14:00 UTC", "commit": "abc1234", "load_before": 1.0, "load_after": 1.5,
                    "cpus": 2}}
    c = plots.caption(doc)
    assert "2026-12-03 14:00 UTC" in c and "abc1234" in c and "python benchmarks/append.py --rounds 3" in c
    assert "/tmp/x.json" not in c and "noisy" in c and "QUICK" not in c
