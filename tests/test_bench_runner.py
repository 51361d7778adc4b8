"""The benchmark suite's fairness machinery (benchmarks/_common.py, benchmarks/run_all.py): the round
runner treats every row alike, the cold-cache drop is checked, README blocks are replaced or refused."""

from __future__ import annotations

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import _common  # noqa: E402
import run_all  # noqa: E402


def test_round_order_rotates_so_every_row_takes_every_position():
    n = 4
    orders = [_common.round_order(n, r) for r in range(n)]
    for order in orders:
        assert sorted(order) == list(range(n))
    for pos in range(n):
        assert sorted(o[pos] for o in orders) == list(range(n))


def test_run_rounds_warms_every_row_once_then_interleaves_and_takes_medians():
    calls = []
    values = {"a": iter([5.0, 1.0, 3.0]), "b": iter([10.0, 30.0, 20.0]), "c": iter([7.0, 7.0, 8.0])}

    def row(name):
        def measure():
            calls.append(("m", name))
            return {"x": next(values[name])}

        def warm():
            calls.append(("w", name))
        return _common.Row(name, measure, warm)

    res = _common.run_rounds([row("a"), row("b"), row("c")], 3, log=None)
    # every row warmed once, before any timed round
    assert calls[:3] == [("w", "a"), ("w", "b"), ("w", "c")]
    assert [c for c in calls if c[0] == "w"] == calls[:3]
    # interleaved, rotating: round 1 a b c, round 2 b c a, round 3 c a b
    assert [c[1] for c in calls[3:]] == list("abc" "bca" "cab")
    # one selection rule for every row: the median (not the best) of the rounds
    assert res["a"].values("x") == [5.0, 1.0, 3.0]
    assert res["a"].med("x") == 3.0 and res["b"].med("x") == 20.0 and res["c"].med("x") == 7.0
    assert res["b"].ratio("x", res["a"]) == pytest.approx(20.0 / 3.0)


def test_run_rounds_without_warmup_callable_warms_with_measure():
    n = []
    res = _common.run_rounds([_common.Row("r", lambda: n.append(1) or {"x": len(n)})], 2, log=None)
    assert len(n) == 3 and res["r"].values("x") == [2, 3]  # the warm-up's figures are discarded


def test_run_rounds_refuses_duplicate_names_and_zero_rounds():
    r = _common.Row("x", lambda: {})
    with pytest.raises(ValueError):
        _common.run_rounds([r, r], 1, log=None)
    with pytest.raises(ValueError):
        _common.run_rounds([r], 0, log=None)


@pytest.fixture
def cached_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(4 << 20))
    _common.warm_cache([str(p)])
    frac = _common.resident_fraction(str(p))
    if frac is None or frac < 0.9:
        pytest.skip("mincore unavailable or the file system does not keep this file cached")
    return str(p)


def test_drop_cache_makes_the_file_cold_and_says_so(cached_file):
    if _common.drop_cache([cached_file], check=False) is None and _common.resident_fraction(cached_file) > 0.05:
        pytest.skip("POSIX_FADV_DONTNEED has no effect on this file system (e.g. tmpfs)")
    _common.warm_cache([cached_file])
    assert _common.drop_cache([cached_file]) <= 0.05
    assert _common.resident_fraction(cached_file) <= 0.05
    _common.warm_cache([cached_file])
    assert _common.resident_fraction(cached_file) >= 0.9


def test_drop_cache_check_fires_when_the_drop_did_not_happen(cached_file, monkeypatch):
    # a "cold" figure measured on a warm file would be mislabelled: the check must catch a no-op drop
    monkeypatch.setattr(_common.os, "posix_fadvise", lambda *a: None)
    with pytest.raises(_common.BenchmarkError):
        _common.drop_cache([cached_file])


def test_readme_blocks_replaced_and_a_missing_marker_refused():
    text = ("intro\n<!-- bench:append -->\nold table\n<!-- /bench:append -->\nmiddle\n"
            "<!-- bench:backup -->\nold\n<!-- /bench:backup -->\nend\n")
    out = run_all.replace_blocks(text, {"append": "NEW 1\n", "backup": "NEW 2"})
    assert out == ("intro\n<!-- bench:append -->\nNEW 1\n<!-- /bench:append -->\nmiddle\n"
                   "<!-- bench:backup -->\nNEW 2\n<!-- /bench:backup -->\nend\n")
    with pytest.raises(run_all.ReadmeMarkerError):
        run_all.replace_blocks(text, {"recovery": "x"})


def test_section_names_the_exact_command():
    s = run_all.section("append", "Appends", ["--seconds", "1.5"], "body")
    assert s.startswith("**Appends.** ") and s.endswith("body")
    assert "`.venv/bin/python benchmarks/append.py --seconds 1.5`" in s


def test_background_window_counts_appends_that_straddle_it():
    import background
    samples = [(0.0, 1.0), (1.5, 0.2), (2.0, 5.0), (9.0, 1.0), (0.5, 0.4)]
    # [2, 4]: the append started before and still running (the stall) counts, one ending at 2.0 does not
    assert background.in_window(samples, 1.8, 4.0) == [(2.0, 5.0)]
    assert background.in_window(samples, 0.2, 1.6) == [(0.0, 1.0), (1.5, 0.2), (0.5, 0.4)]


def test_background_split_attributes_overlapping_wal_syncs_to_each_append():
    import background
    syncs = [(1.0, 2.0), (3.0, 3.5), (4.0, 6.0)]
    samples = [(0.0, 1.5), (2.5, 1.0), (3.2, 2.0), (7.0, 1.0), (0.0, 10.0)]
    got = background.overlap_split(samples, syncs)
    assert got == pytest.approx([0.5, 0.5, 1.5, 0.0, 3.5])
