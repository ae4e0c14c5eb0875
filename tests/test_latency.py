"""Latency as the budget (docs/latency.md), tested without timing anything: the target section, the alternating
timer on a fake clock, the latency table's bookkeeping and cache, its lower envelope (round_to: auto), the
plan fitted on a fake measured latency, and the prune job end to end with a fake timer whose "milliseconds" are
the model's counted MACs (so the job's latency columns can be checked against its MACs columns exactly)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from runner.config import Budget, TargetConfig, parse_grid
from runner.errors import InputError
from runner.planning.curves import curve
from runner.planning.solve import Planner
from runner.planning.table import Entry, Table, avoided, envelope, fill_table, latency_curves, read_table
from runner.planning.timing import Rounds, Spread, alternate, check_target, key_file, provider_of


# ---- the target section ----

def test_target_defaults_to_none_and_keeps_todays_behaviour() -> None:
    grid = parse_grid({}, "g")
    assert grid.plan.target is None and grid.plan.round_to == 1
    t = parse_grid({"plan": {"target": {}}}, "g").plan.target
    assert (t.runtime, t.device, t.batch, t.threads, t.provider, t.clock, t.precision) == (
        "onnxruntime", "cpu", 1, None, None, "wall", 0.01)
    assert TargetConfig(runtime="onnxruntime", batch=32).label == "onnxruntime/cpu/b32"
    assert TargetConfig(runtime="torch", batch=1, threads=4, clock="cpu").label == "torch/cpu/b1/t4/cpu-time"


def test_the_precision_is_in_neither_the_tables_key_nor_the_jobs_identity() -> None:
    from runner.job.prune import job_identity
    from runner.planning.timing import target_key

    grids = [parse_grid({"plan": {"target": {"precision": p, "passes": n}}}, "g")
             for p, n in ((0.01, 1), (0.002, 3), (None, 1))]
    assert len({json.dumps(job_identity(g, "ab"), sort_keys=True) for g in grids}) == 1
    assert len({key_file(target_key(g.plan.target, "ab", 32)) for g in grids}) == 1
    other = parse_grid({"plan": {"target": {"batch": 8}}}, "g")
    assert job_identity(other, "ab") != job_identity(grids[0], "ab")


def test_a_latency_budget_is_labelled_and_planned_into_its_folder() -> None:
    b = Budget(latency=0.6)
    assert (b.kind, b.keep, b.label) == ("latency", 0.6, "latency0.6")


@pytest.mark.parametrize("plan, message", [
    ({"budgets": [{"latency": 0.6}]}, "plan.target: budget latency0.6 needs a target"),
    ({"round_to": "auto"}, "plan.target: round_to: auto reads the latency table"),
    ({"budgets": [{"latency": 0.6, "macs": 0.5}]}, "give exactly one of macs, params, latency"),
    ({"budgets": [{"latency": 1.5}], "target": {}}, "plan.budgets[0].latency: out of range"),
    ({"target": {"runtime": "torch", "provider": "tensorrt"}}, "plan.target: a provider is an onnxruntime setting"),
    ({"target": {"runtime": "tvm"}}, "plan.target.runtime"),
    ({"target": {"batch": 0}}, "plan.target.batch"),
    ({"target": {"device": "cuda", "clock": "cpu"}}, "CPU time says nothing of a GPU"),
    ({"target": {"precision": 0}}, "plan.target.precision"),
])
def test_bad_target_input_is_one_line(plan: dict, message: str) -> None:
    with pytest.raises(InputError) as e:
        parse_grid({"plan": plan}, "g")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_impossible_target_is_refused_before_anything_runs(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="plan.target.device.*no CUDA GPU"):
        check_target(TargetConfig(device="cuda"))
    with pytest.raises(InputError, match="plan.target.provider.*TensorrtExecutionProvider is not installed"):
        check_target(TargetConfig(provider="tensorrt"))
    check_target(TargetConfig(provider="cpu"))
    check_target(None)
    assert provider_of(TargetConfig()) == "CPUExecutionProvider"


def test_the_command_refuses_an_impossible_target_with_exit_2(tmp_path, cli) -> None:
    from e2e_helpers import grid_dict, write_grid

    path = write_grid(tmp_path / "g.yaml", grid_dict(tmp_path, plan={"budgets": [{"latency": 0.6}],
                                                                     "target": {"provider": "tensorrt"}}))
    run = cli(["--grid", str(path), "--dry-run"], cwd=tmp_path, command="prune")
    assert run.returncode == 2 and len(run.err_lines) == 1, run.stderr
    assert run.err_lines[0].startswith("error: plan.target.provider: onnxruntime provider TensorrtExecutionProvider")


# ---- alternating rounds on a fake clock ----

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_alternate_times_each_forward_in_rounds_on_the_clock_it_is_given() -> None:
    clock, calls = FakeClock(), []

    def forward(name: str, costs: list[float]):
        it = iter(costs)

        def f() -> None:
            calls.append(name)
            clock.now += next(it)
        return f

    base = [0.010] * 2 + [0.010, 0.012, 0.011, 0.050, 0.010]  # 2 warm-up forwards, then 5 timed
    pruned = [0.1] * 2 + [0.004, 0.005, 0.006, 0.005, 0.030]
    a, b = alternate([forward("base", base), forward("pruned", pruned)], Rounds(2, 5, 0.0, 100), clock)
    assert calls == ["base"] * 2 + ["pruned"] * 2 + ["base", "pruned"] * 5
    assert (a.median, a.runs, b.median, b.runs) == (pytest.approx(11.0), 5, pytest.approx(5.0), 5)
    assert (a.low, a.high) == (pytest.approx(10.0), pytest.approx(12.0))  # the 25th and 75th percentiles
    assert (b.low, b.high) == (pytest.approx(5.0), pytest.approx(6.0))


def test_alternate_runs_until_min_seconds_and_stops_at_max_runs() -> None:
    clock = FakeClock()

    def f() -> None:
        clock.now += 0.125

    assert alternate([f, f], Rounds(0, 1, 1.0, 100), clock)[0].runs == 4  # 0.25 s per round
    assert alternate([f], Rounds(0, 1, 1e9, 7), clock)[0].runs == 7


def test_alternate_goes_on_until_the_paired_ratio_is_as_precise_as_asked() -> None:
    clock, n = FakeClock(), [0]

    def base() -> None:
        clock.now += 0.010

    def pruned() -> None:  # 0.5 and 0.6 of the base in turn: an interquartile range of 0.1
        n[0] += 1
        clock.now += 0.005 if n[0] % 2 else 0.006

    # se = sqrt(pi / 2) * (0.1 / 1.349) / sqrt(runs): <= 0.01 from 87 runs, <= 0.02 from 22
    for precision, runs, ratio in ((0.01, 87, 0.5), (0.02, 22, 0.55)):
        n[0] = 0
        a, b = alternate([base, pruned], Rounds(0, 20, 0.0, 1000, precision), clock)
        assert (a.runs, b.runs, b.ratio, a.ratio, a.ratio_se) == (runs, runs, pytest.approx(ratio), None, None)
        assert precision * 0.95 < b.ratio_se <= precision
    n[0] = 0  # 15.5 ms a round: a precision out of reach is given up after max_seconds
    assert alternate([base, pruned], Rounds(0, 20, 0.0, 1000, 1e-6, 1.0), clock)[1].runs == 65
    n[0] = 0  # no precision asked: min_runs
    assert alternate([base, pruned], Rounds(0, 20, 0.0, 1000), clock)[1].runs == 20


def test_a_drift_over_many_rounds_counts_in_the_ratios_standard_error() -> None:
    from runner.planning.timing import ratio_stats

    base = np.full(100, 10.0)
    steady = np.tile([5.0, 6.0], 50)  # 0.5 and 0.6 in turn: every stretch of rounds alike
    assert ratio_stats(steady, base) == (pytest.approx(0.55), pytest.approx(1.2533 * 0.1 / 1.349 / 10))
    # five stretches of 20 rounds at 0.50, 0.51, ... 0.54: the rounds' spread (interquartile 0.02) says 0.0019,
    # the stretches' means (sd 0.0158) say 0.0071
    drift = np.repeat([5.0, 5.1, 5.2, 5.3, 5.4], 20)
    assert ratio_stats(drift, base) == (pytest.approx(0.52), pytest.approx(0.01 * np.sqrt(2.5) / np.sqrt(5)))
    assert ratio_stats(drift[:9], base[:9])[1] == 0.0  # too few rounds for stretches: the rounds' spread alone


# ---- the table: bookkeeping, cache, envelope ----

KEY = {"runtime": "onnxruntime", "version": "1", "device": "cpu", "provider": "CPUExecutionProvider",
       "machine": "x", "batch": 32, "threads": None, "clock": "wall", "image_size": 32, "base_sha256": "ab"}
TRUE_MS = {("a", 2): 8.0, ("a", 4): 9.0, ("a", 6): 5.0, ("b", 1): 7.0, ("b", 3): 4.0}  # base 10 ms


def fake_measure(log: list) -> callable:
    def measure(unit: str, k: int) -> tuple[Spread, Spread]:
        log.append((unit, k))
        return Spread(10.0, 9.5, 10.5, 20), Spread(TRUE_MS[unit, k], TRUE_MS[unit, k] - 0.1, TRUE_MS[unit, k] + 0.1, 20)
    return measure


def test_the_table_is_filled_written_per_entry_and_reused(tmp_path) -> None:
    path, calls = tmp_path / key_file(KEY), []
    table, measured = fill_table(path, KEY, {"a": [2, 4], "b": [1]}, fake_measure(calls))
    assert measured == 3 and calls == [("a", 2), ("a", 4), ("b", 1)]
    assert table.saved("a", 2) == 2.0 and table.saved("a", 4) == 1.0 and table.base_ms == 10.0
    assert read_table(path, KEY).entries == table.entries  # written as measured
    # a later plan with the same key measures only what the table lacks
    table, measured = fill_table(path, KEY, {"a": [2, 4, 6], "b": [1, 3]}, fake_measure(calls))
    assert measured == 2 and calls[3:] == [("a", 6), ("b", 3)]
    # another key (another machine, runtime version, base model ...) measures everything again
    other = {**KEY, "base_sha256": "cd"}
    _, measured = fill_table(path, other, {"a": [2]}, fake_measure(calls))
    assert measured == 1 and json.loads(path.read_text())["key"] == other
    assert path.name.startswith("onnxruntime-cpu-b32-") and key_file(other) != key_file(KEY)


def test_entries_timed_to_a_looser_precision_are_timed_again_and_record_theirs(tmp_path) -> None:
    path, calls = tmp_path / key_file(KEY), []
    table, _ = fill_table(path, KEY, {"a": [2, 4]}, fake_measure(calls))  # a fixed number of rounds
    assert table.entries["a"][2].precision is None
    table, measured = fill_table(path, KEY, {"a": [2, 4], "b": [1]}, fake_measure(calls), precision=0.02)
    assert measured == 3 and calls[2:] == [("a", 2), ("a", 4), ("b", 1)]
    assert {e.precision for by_k in table.entries.values() for e in by_k.values()} == {0.02}
    assert read_table(path, KEY).entries["a"][4].precision == 0.02
    for looser_or_same in (0.02, 0.05, None):  # what is as precise as asked is reused
        assert fill_table(path, KEY, {"a": [2, 4], "b": [1]}, fake_measure(calls), precision=looser_or_same)[1] == 0
    assert fill_table(path, KEY, {"a": [2]}, fake_measure(calls), precision=0.01)[1] == 1 and calls[-1] == ("a", 2)


def test_passes_time_the_whole_table_again_and_their_spread_counts_in_the_error(tmp_path) -> None:
    path, calls = tmp_path / key_file(KEY), []
    ratios = {"a": iter([0.80, 0.84, 0.83]), "b": iter([0.5, 0.5, 0.5])}

    def measure(unit: str, k: int) -> tuple[Spread, Spread]:
        calls.append((unit, k))
        r = next(ratios[unit])
        return Spread(10.0, 10.0, 10.0, 20), Spread(10 * r, 10 * r, 10 * r, 20, r, 0.01)

    def stops_after(n: int):
        def m(unit: str, k: int):
            if len(calls) == n:
                raise KeyboardInterrupt
            return measure(unit, k)
        return m

    with pytest.raises(KeyboardInterrupt):  # killed after the first pass and one timing of the second
        fill_table(path, KEY, {"a": [2], "b": [1]}, stops_after(3), precision=0.01, passes=2)
    table, timed = fill_table(path, KEY, {"a": [2], "b": [1]}, measure, precision=0.01, passes=2)
    assert timed == 1 and calls == [("a", 2), ("b", 1), ("a", 2), ("b", 1)]  # a whole pass before the next
    a, b = table.entries["a"][2], table.entries["b"][1]
    assert a.passes == ((0.80, 0.01), (0.84, 0.01)) and a.ratio == pytest.approx(0.82)
    assert a.se == pytest.approx(0.02)  # the passes' spread, 0.0283 / sqrt(2), above their own 0.0071
    assert b.ratio == 0.5 and b.se == pytest.approx(math.sqrt(2) * 0.01 / 2, abs=1e-6)  # no spread: their own
    assert table.saved("a", 2) == pytest.approx(1.8) and b.runs == 40
    assert read_table(path, KEY).entries["a"][2] == a  # passes survive the file
    assert fill_table(path, KEY, {"a": [2], "b": [1]}, measure, precision=0.01, passes=1)[1] == 0
    table, timed = fill_table(path, KEY, {"a": [2]}, measure, precision=0.01, passes=3)
    assert timed == 1 and table.entries["a"][2].ratio == pytest.approx((0.80 + 0.84 + 0.83) / 3)


def test_a_killed_table_keeps_what_it_measured(tmp_path) -> None:
    path, calls = tmp_path / "t.json", []
    measure = fake_measure(calls)

    def dies_on_third(unit: str, k: int):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(unit, k)

    with pytest.raises(KeyboardInterrupt):
        fill_table(path, KEY, {"a": [2, 4, 6]}, dies_on_third)
    assert sorted(read_table(path, KEY).entries["a"]) == [2, 4]
    _, measured = fill_table(path, KEY, {"a": [2, 4, 6]}, measure)
    assert measured == 1 and calls[-1] == ("a", 6)


def table_of(entries: dict) -> Table:
    t = Table(dict(KEY))
    for (u, k), ms in entries.items():
        t.entries.setdefault(u, {})[k] = Entry(ms, ms, ms, 10.0, 20)
    return t


def test_a_plans_prediction_is_the_base_less_the_summed_savings_interpolated_between_entries() -> None:
    t = table_of(TRUE_MS)
    assert t.predict({"a": 2, "b": 3}) == pytest.approx(10 - 2 - 6)
    assert t.saved("a", 5) == pytest.approx((1.0 + 5.0) / 2)  # between K=4 (saves 1) and K=6 (saves 5)
    assert t.saved("b", 2) == pytest.approx((3.0 + 6.0) / 2)
    assert t.saved("a", 1) == pytest.approx(1.0)  # between K=0 (saves 0) and K=2 (saves 2)
    with pytest.raises(ValueError):
        t.saved("a", 7)


def test_round_to_auto_keeps_the_lower_envelope_and_lists_the_avoided_counts() -> None:
    t = table_of(TRUE_MS)
    assert envelope(t, "a") == [2, 6]  # K=4 (9 ms) is slower than K=2 (8 ms): never chosen
    assert avoided(t, "a", 8) == [4]  # keeps 4 channels
    assert envelope(t, "b") == [1, 3] and avoided(t, "b", 4) == []
    slow = table_of({("c", 1): 11.0, ("c", 2): 9.0})
    assert envelope(slow, "c") == [2]  # slower than the base itself


def two_unit_curves():
    a = curve("a", 8, [2, 4, 6], [0.5, 1.0, 4.0], [20, 40, 60], [2, 4, 6])
    b = curve("b", 4, [1, 3], [0.2, 3.0], [10, 30], [1, 3])
    return [a, b]


def test_every_method_plans_with_the_tables_savings_and_auto_never_picks_a_slow_count() -> None:
    t = table_of(TRUE_MS)
    wanted = {"a": [2, 4, 6], "b": [1, 3]}
    curves = latency_curves(two_unit_curves(), t, wanted, auto=False)
    assert [(o.k, o.latency) for o in curves[0].points] == [(0, 0.0), (2, 2.0), (4, 1.0), (6, 5.0)]
    assert curves[0].points[2].drop == 1.0 and curves[0].points[2].macs == 40  # the sweep's figures kept
    auto = latency_curves(two_unit_curves(), t, wanted, auto=True)
    assert [o.k for o in auto[0].points] == [0, 2, 6]
    # keep at most 0.7 of 10 ms: save >= 3 ms. knapsack: a K=2 + b K=1 saves 5 ms for 0.7 points
    for method in ("knapsack", "threshold", "uniform"):
        plan = Planner(curves, "latency", 0.7, 10.0, method, points_only=True).plan()
        assert plan is not None and 10.0 - plan.saving <= 7.0 + 1e-9, method
        assert all(k in (0, *wanted[u]) for u, k in plan.ks.items()), method  # only K the table measured
    assert Planner(curves, "latency", 0.7, 10.0, "knapsack", points_only=True).plan().ks == {"a": 2, "b": 1}


def test_a_latency_budget_never_chooses_a_k_slower_than_a_smaller_one() -> None:
    from runner.planning.target import OnTarget

    t, wanted = table_of(TRUE_MS), {"a": [2, 4, 6], "b": [1, 3]}
    on = OnTarget(TargetConfig(), None, t, Path("x"), latency_curves(two_unit_curves(), t, wanted, False),
                  latency_curves(two_unit_curves(), t, wanted, True), 0, 0, {})
    assert [o.k for o in on.curves_for("latency")[0].points] == [0, 2, 6]  # a K=4 is slower than a K=2
    assert [o.k for o in on.curves_for("macs")[0].points] == [0, 2, 4, 6]
    # threshold at 0.45 of 10 ms: from every K, a K=4 (saves 1 ms, drop 1.0) with b K=3; on the envelope a
    # K=2 (saves 2 ms, drop 0.5) with b K=3: faster and more accurate
    plans = {kind: Planner(on.curves_for(kind), "latency", 0.45, 10.0, "threshold", points_only=True).plan()
             for kind in ("macs", "latency")}
    assert plans["macs"].ks == {"a": 4, "b": 3} and plans["macs"].saving == 7.0
    assert plans["latency"].ks == {"a": 2, "b": 3} and plans["latency"].saving == 8.0
    assert plans["latency"].predicted_drop < plans["macs"].predicted_drop


def test_the_latency_fit_refits_on_the_measured_time_and_stops_at_the_first_that_meets_it() -> None:
    curves = latency_curves(two_unit_curves(), table_of(TRUE_MS), {"a": [2, 4, 6], "b": [1, 3]}, auto=False)
    planner = Planner(curves, "latency", 0.7, 10.0, "knapsack", points_only=True)
    measured = []

    def count(ks) -> float:  # the real model saves half what the table says: savings do not add
        ms = 10.0 - 0.5 * sum(10.0 - TRUE_MS[u, k] for u, k in ks.items() if k)
        measured.append((dict(ks), ms))
        return ms

    plan = planner.fit(count, first=True)
    # a K=2 + b K=1: predicted 5 ms saved, measured 7.5 ms (misses 7); asked for 5.5 ms: b K=3 alone (6 ms,
    # least drop) measures 7.0 and meets the budget: the refit stops there
    assert measured == [({"a": 2, "b": 1}, 7.5), ({"a": 0, "b": 3}, 7.0)]
    assert plan.ks == {"a": 0, "b": 3} and plan.counted_kept == 7.0


def test_a_timed_plan_fits_only_when_its_kept_fraction_plus_two_standard_errors_does(monkeypatch) -> None:
    """A median of 0.599 with se 0.006 (the torch batch-1 refit that kept 0.624 when timed again) counts as 0.611
    of the base: it misses a 0.6 budget and the refit goes on; a median of 0.58 with the same se fits."""
    from runner.planning import target as target_module
    from runner.planning.target import OnTarget, Timed

    assert Timed(6.0, 5.0, 7.0, 10.0, 0.599, 0.006).bound == pytest.approx(0.611)
    assert Timed(6.0, 5.0, 7.0, 10.0).bound == 0.6  # no paired rounds: no error to add
    ratios = iter([0.599, 0.58])
    timer = SimpleNamespace(pair=lambda model: (Spread(10.0, 9.0, 11.0, 30),
                                                Spread(6.0, 5.0, 7.0, 30, next(ratios), 0.006)))
    monkeypatch.setattr(target_module, "pruned_copy", lambda base, removal, size: "pruned")
    t = table_of(TRUE_MS)
    on = OnTarget(TargetConfig(), timer, t, Path("x"), [], [], 0, 0, {})
    seen = []
    count = on.count(None, {"a": list(range(8)), "b": list(range(4))}, 32, lambda ks, timed: seen.append(timed))
    assert count({"a": 2, "b": 0}) == pytest.approx(0.611 * t.base_ms)
    assert count({"a": 2, "b": 1}) == pytest.approx(0.592 * t.base_ms)
    assert [x.kept for x in seen] == [0.599, 0.58]
    curves = latency_curves(two_unit_curves(), t, {"a": [2, 4, 6], "b": [1, 3]}, auto=False)
    ratios = iter([0.599, 0.58])
    plan = Planner(curves, "latency", 0.6, t.base_ms, "knapsack", points_only=True).fit(count, first=True)
    assert plan is not None and len(seen) == 4 and plan.counted_kept == pytest.approx(0.592 * t.base_ms)


@pytest.mark.parametrize("bump, kept, ratios", [
    (None, 0.65, [0.9, 0.8, 0.7, 0.6, 0.65]),  # scan down by 0.1 to the first fit, then bisect: 0.65 fits
    (0.65, 0.6, [0.9, 0.8, 0.7, 0.6, 0.65]),  # 0.65 is slow (a width the kernels handle badly): 0.6 is kept
])
def test_uniform_fits_its_ratio_on_the_measured_time_like_global(bump, kept, ratios) -> None:
    """Two units of 20 channels, K = 1 .. 19: kept ratios 0.95 .. 0.05; the measured time is 100 r^2 ms (but
    `bump` times 60 ms); the budget keeps 0.45 of 100 ms. The table's summed savings play no part."""
    units = [curve(u, 20, list(range(1, 20)), [0.1 * k for k in range(1, 20)], [k for k in range(1, 20)],
                   [k for k in range(1, 20)]) for u in ("a", "b")]
    planner = Planner(units, "latency", 0.45, 100.0, "uniform", points_only=True)
    timed = []

    def count(ks) -> float:
        r = round((20 - ks["a"]) / 20, 2)
        assert ks["b"] == ks["a"]  # one ratio for every unit
        timed.append(r)
        return 60.0 if r == bump else 100 * r * r

    plan = planner.fit(count, first=True)
    assert timed == ratios
    assert plan.ks == {"a": round(20 * (1 - kept)), "b": round(20 * (1 - kept))}
    assert plan.counted_kept == pytest.approx(100 * kept * kept)
    assert Planner(units, "latency", 0.001, 100.0, "uniform", points_only=True).fit(count, first=True) is None


def test_an_unreachable_latency_budget_names_the_best_reachable_fraction() -> None:
    from runner.planning.target import OnTarget

    t = table_of({("a", 2): 9.0, ("b", 1): 8.0, ("b", 3): 8.5})
    curves = latency_curves(two_unit_curves(), t, {"a": [2], "b": [1, 3]}, False)
    on = OnTarget(TargetConfig(), None, t, Path("x"), curves, curves, 0, 0, {})
    assert on.fastest() == {"a": 2, "b": 1} and on.best_kept() == pytest.approx(0.7)  # saves 1 + 2 of 10 ms
    with pytest.raises(InputError) as e:
        on.check_budget("latency0.6", 0.6)
    assert str(e.value).startswith("plan.budgets: ") and "latency0.6" in str(e.value) and "0.700" in str(e.value)
    assert "the latency table says" in str(e.value) and "\n" not in str(e.value)
    on.check_budget("latency0.7", 0.7)
    timed = []

    def count(ks) -> float:
        timed.append(dict(ks))
        return 7.5  # the fastest plan, measured: savings did not add
    with pytest.raises(InputError, match=r"timing every unit at its fastest K \(plus two standard errors\) shows no plan keeps less than 0.750"):
        on.check_budget("latency0.7", 0.7, count)
    assert timed == [{"a": 2, "b": 1}]
    on.check_budget("latency0.8", 0.8, count)


# ---- the prune job on a target, with a fake timer ----

MS_PER_MAC = 1e-5  # the fake timer's time: a model's counted MACs per image, as milliseconds


@pytest.fixture(scope="module")
def on_target(ray_session, sweep_checkpoint, tmp_path_factory):
    """A prune job with target torch/cpu/b1 (no fine-tuning): budgets latency 0.8 and macs 0.7 x four methods,
    timed by a fake timer whose milliseconds are the model's counted MACs; then the same job again (the table
    reused: resumed) and an unreachable budget added on --resume."""
    from e2e_helpers import e2e, grid_dict, write_grid

    from model.resnet import ResNet18
    from runner.api import prune as prune_api
    from runner.planning import timing
    from runner.planning.removal import counts

    base_ms = counts(ResNet18(width=0.125).eval(), 32).macs * MS_PER_MAC
    calls = []

    def fake_pair(self, model):
        calls.append(model)
        ms = counts(model, 32).macs * MS_PER_MAC
        return Spread(base_ms, base_ms, base_ms, 20), Spread(ms, ms * 0.99, ms * 1.01, 20)

    tmp = tmp_path_factory.mktemp("latency")
    grid = grid_dict(tmp, e2e(sweep_checkpoint), name="timed",
                     sweep={"layers": "all", "unit": "group", "k": {"fractions": [0.25, 0.5]}, "criteria": ["l1_norm"]},
                     plan={"budgets": [{"latency": 0.8}, {"macs": 0.7}], "max_corrections": 1, "score_on": "test",
                           "methods": ["knapsack", "threshold", "uniform", "global"],
                           "finetune": {"epochs": 0}, "target": {"runtime": "torch", "device": "cpu", "batch": 1}})
    path = write_grid(tmp / "timed.yaml", grid)
    original = timing.Timer.pair
    timing.Timer.pair = fake_pair
    try:
        table = prune_api(path)
        first_calls = len(calls)
        again = prune_api(path, resume=True)
        second_calls = len(calls)
        with pytest.raises(InputError) as unreachable:
            prune_api(path, resume=True,
                      overrides=("plan.budgets=[{latency: 0.8}, {macs: 0.7}, {latency: 0.05}]",))
    finally:
        timing.Timer.pair = original
    folder = Path(table.attrs["folder"])
    return SimpleNamespace(table=table, again=again, folder=folder, base_ms=base_ms, first_calls=first_calls,
                           second_calls=second_calls, unreachable=str(unreachable.value))


@pytest.mark.slow
def test_every_plan_is_timed_on_the_target_macs_plans_too(on_target) -> None:
    t = on_target.table
    assert len(t) == 8 and (t["target"] == "torch/cpu/b1").all()
    # the fake timer's milliseconds are counted MACs: the job's latency columns must equal its MACs columns
    assert (t["latency_kept"] - t["macs_kept"]).abs().max() < 1e-9
    assert (t["latency_ms"] - t["macs"] * MS_PER_MAC).abs().max() < 1e-9
    assert (t["latency_low"] <= t["latency_ms"]).all() and (t["latency_ms"] <= t["latency_high"]).all()
    assert t["latency_ms_b1"].isna().all()  # torch at batch 1 and 64 only without a target


@pytest.mark.slow
def test_latency_plans_meet_their_budget_on_the_measured_time(on_target) -> None:
    t = on_target.table
    timed = t[t["budget"] == "latency0.8"]
    assert sorted(timed["method"]) == ["global", "knapsack", "threshold", "uniform"]
    assert (timed["latency_kept"] <= 0.8).all()
    assert (Path(on_target.folder) / "plans" / "latency0.8-knapsack" / "pruned.pt").is_file()


@pytest.mark.slow
def test_the_prediction_is_the_tables_base_less_the_entries_savings(on_target) -> None:
    files = list((on_target.folder / "latency").glob("torch-cpu-b1-*.json"))
    assert len(files) == 1
    raw = json.loads(files[0].read_text())
    assert raw["key"]["runtime"] == "torch" and raw["key"]["batch"] == 1 and raw["key"]["base_sha256"]
    assert raw["base_ms"] == pytest.approx(on_target.base_ms, rel=1e-4)
    for row in on_target.table.to_dict("records"):
        units = json.loads((Path(row["folder"]) / "plan.json").read_text())["units"]
        saved = 0.0
        for u in units:
            if u["k"] and row["method"] not in ("uniform", "global"):
                entry = raw["entries"][u["unit"]][str(u["k"])]
                saved += entry["base_ms"] - entry["ms"]
        if row["method"] not in ("uniform", "global"):  # their Ks may fall between entries (interpolated)
            assert row["latency_summed_ms"] == pytest.approx(raw["base_ms"] - saved, rel=1e-6)
            assert row["latency_predicted_ms"] == pytest.approx(raw["base_ms"] - row["macs_overlap"] * saved, rel=1e-6)
        assert 0 < row["macs_overlap"] <= 1 + 1e-9


@pytest.mark.slow
def test_the_table_is_reused_by_a_later_job_and_its_cost_recorded(on_target) -> None:
    cost = json.loads((on_target.folder / "latency" / "cost.json").read_text())
    assert cost["measured"] == 0 and cost["entries"] > 0  # the second job measured nothing
    entries = cost["entries"]
    # the first job timed every entry once, then its plans (and the fastest plan); the resumed one, whose plans
    # are made, only the fastest plan (the latency budget checked against the table)
    assert on_target.first_calls > entries + 8
    assert on_target.second_calls - on_target.first_calls == 1
    assert on_target.again["latency_ms"].tolist() == on_target.table["latency_ms"].tolist()


@pytest.mark.slow
def test_the_report_plots_accuracy_against_measured_latency_and_the_prediction_error(on_target) -> None:
    report = (on_target.folder / "report.md").read_text()
    assert "### Latency on torch/cpu/b1" in report and "prediction error" in report
    for name in ("plans_latency.png", "latency_table.png"):
        assert (on_target.folder / "plots" / name).stat().st_size > 1000


@pytest.mark.slow
def test_an_unreachable_latency_budget_is_one_line(on_target) -> None:
    assert on_target.unreachable.startswith("plan.budgets: ") and "latency0.05" in on_target.unreachable
    assert "no plan keeps less than" in on_target.unreachable and "\n" not in on_target.unreachable


# ---- real timing (slow group) ----

@pytest.mark.slow
def test_real_timing_sees_a_halved_network_run_faster_in_process_and_alone(tmp_path) -> None:
    """The Timer on onnxruntime (CPU time, one thread) and scripts/onnx_latency.py in a process of its own agree
    that a ResNet-18 with every unit's channels halved runs in well under the base's time."""
    import subprocess
    import sys

    from model.groups import list_groups
    from model.resnet import ResNet18
    from runner.planning.export import export_onnx
    from runner.planning.removal import pruned_copy
    from runner.planning.timing import Timer

    base = ResNet18(width=0.25).eval()
    groups = list_groups(base, 32)
    removal = {g.name: list(range(g.channels // 2)) for g in groups}
    pruned = pruned_copy(base, removal, 32)
    target = TargetConfig(runtime="onnxruntime", batch=8, threads=1, clock="cpu")

    def export(path: Path, model) -> None:
        export_onnx(path, model, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32)

    timer = Timer(target, base, 32, export, Rounds(3, 20, 0.5, 200))
    try:
        b, p = timer.pair(pruned)
    finally:
        timer.close()
    assert p.median < 0.8 * b.median and b.low <= b.median <= b.high
    export(tmp_path / "base.onnx", base)
    export(tmp_path / "pruned.onnx", pruned)
    script = Path(__file__).parents[1] / "scripts" / "onnx_latency.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "base.onnx"), str(tmp_path / "pruned.onnx"),
                          "--batch", "8", "--threads", "1", "--clock", "cpu", "--runs", "20", "--min-seconds", "0.5"],
                         check=True, capture_output=True, text=True).stdout
    alone = json.loads(out)["files"][str(tmp_path / "pruned.onnx")]
    assert alone["kept"] < 0.8 and alone["kept"] == pytest.approx(p.median / b.median, abs=0.2)


def test_the_prediction_scales_summed_savings_by_the_plans_macs_overlap() -> None:
    from runner.planning.target import OnTarget, Timed, latency_columns

    t = table_of(TRUE_MS)
    on = OnTarget(TargetConfig(batch=32), None, t, Path("x"), [], [], 0, 0, {})
    cols = latency_columns(on, Timed(5.0, 4.5, 5.5, 10.0), {"a": 2, "b": 3}, overlap=0.75)
    assert cols["latency_summed_ms"] == pytest.approx(10 - 2 - 6)
    assert cols["latency_predicted_ms"] == pytest.approx(10 - 0.75 * 8)
    assert cols["latency_kept"] == 0.5 and cols["target"] == "onnxruntime/cpu/b32"
    assert math.isnan(cols["latency_kept_se"]) and math.isnan(cols["latency_predicted_se"])  # none recorded
    # entries with standard errors (fractions of the base): the plan's is their root sum of squares, times
    # the overlap; the measured kept fraction is the paired per-round ratio when the rounds gave one
    t.entries["a"][2] = replace(t.entries["a"][2], se=0.03)
    t.entries["b"][3] = replace(t.entries["b"][3], se=0.04)
    cols = latency_columns(on, Timed(5.0, 4.5, 5.5, 10.0, 0.52, 0.01), {"a": 2, "b": 3}, overlap=0.75)
    assert cols["latency_predicted_se"] == pytest.approx(0.75 * 0.05)
    assert (cols["latency_kept"], cols["latency_kept_se"]) == (0.52, 0.01)


def test_a_saving_is_a_fraction_of_its_own_rounds_base_and_interpolation_widens_no_error() -> None:
    t = table_of({("a", 2): 8.0, ("a", 4): 6.0})  # base 10 in both entries
    t.entries["b"] = {2: Entry(9.0, 9.0, 9.0, 12.0, 20, se=0.02)}  # a slow spell: 12 ms base, saves 1/4
    t.entries["a"] = {k: replace(e, se=0.01 * k) for k, e in t.entries["a"].items()}
    assert t.base_ms == 10.0 and t.saved("b", 2) == pytest.approx(2.5)  # 0.25 of the table's 10 ms
    assert t.saved("a", 3) == pytest.approx(3.0)
    assert t.se({"a": 3, "b": 2}) == pytest.approx(math.hypot(0.04, 0.02))  # K=3 takes K=4's larger error
    assert t.se({"a": 1}) == pytest.approx(0.02) and t.se({"a": 0}) == 0.0


def test_the_report_says_whether_a_macs_plan_was_slower_than_the_latency_plan() -> None:
    import pandas as pd

    from runner.outputs.latency import versus

    row = {"accuracy_removed": 50.0, "final_low": 70.0, "final_high": 74.0}
    table = pd.DataFrame([
        {**row, "budget": "latency0.6", "method": "knapsack", "latency_ms": 4.0, "latency_kept": 0.5,
         "macs_kept": 0.6, "accuracy_final": 72.0},
        {**row, "budget": "macs0.5", "method": "knapsack", "latency_ms": 5.0, "latency_kept": 0.625,
         "macs_kept": 0.5, "accuracy_final": 72.5},
        {**row, "budget": "macs0.5", "method": "uniform", "latency_ms": 4.5, "latency_kept": 0.56,
         "macs_kept": 0.5, "accuracy_final": float("nan")},
    ])
    lines = versus(table)
    assert lines[1] == "MACs plans against latency plans of the same method, on the target:"
    assert lines[3] == ("- `knapsack`: the macs0.5 plan runs at 5.00 ms (0.625 of the base), 25% slower than the "
                        "latency0.6 plan at 4.00 ms (0.500); accuracy 72.50% [70.00, 74.00] against 72.00% [70.00, "
                        "74.00], MACs kept 0.500 against 0.600.")
    assert len(lines) == 4  # uniform has no latency plan to compare with
    assert versus(table[table["budget"] == "macs0.5"]) == []


def test_the_report_says_when_a_predictions_error_is_beyond_the_timing_noise() -> None:
    from runner.outputs.latency import beyond_noise

    row = {"latency_kept": 0.60, "latency_kept_se": 0.006, "latency_predicted_se": 0.008}
    assert not beyond_noise({**row, "latency_predicted_kept": 0.60 + 0.0199})  # 2 x 0.010 = 0.020
    assert beyond_noise({**row, "latency_predicted_kept": 0.60 - 0.0201})
    assert not beyond_noise({**row, "latency_predicted_kept": 0.9, "latency_predicted_se": float("nan")})
