"""Planning on plain numbers: curves, the three methods (knapsack against brute force), the re-plan that meets a
counted budget, the combined-plan correction, the `plan` section, plans.csv and plan.json. No torch."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from runner.errors import InputError
from runner.outputs.plans import COLUMNS, plan_folder, plans_table, read_plan_json, read_plans_csv, write_plan_json, \
    write_plans_csv
from runner.config import PLAN_METHODS as config_methods
from runner.config import Budget, PlanConfig, parse_grid
from runner.planning.correction import Measured, accepts, correct
from runner.planning.curves import Curve, Option, allowed_keeps, check_round_to, choices, curve
from runner.planning.solve import METHODS, Plan, Planner, knapsack, threshold


def linear(unit: str, channels: int, ks: list[int], drops: list[float], per_channel: int) -> Curve:
    """A curve whose savings grow by `per_channel` MACs (and per_channel // 10 params) per channel removed."""
    return curve(unit, channels, ks, drops, [k * per_channel for k in ks], [k * (per_channel // 10) for k in ks])


def random_options(rng: random.Random, units: int, points: int) -> dict[str, list[Option]]:
    out = {}
    for u in range(units):
        channels = rng.choice([4, 8, 16])
        ks = sorted(rng.sample(range(1, channels + 1), min(points, channels)))
        macs, params = rng.randint(1, 9) * 100, rng.randint(1, 9)  # per channel
        c = curve(f"u{u}", channels, ks, [rng.random() * 5 for _ in ks], [macs * k for k in ks], [params * k for k in ks])
        out[c.unit] = list(choices(c))
    return out


# --- curves ---------------------------------------------------------------------------------------------------

def test_a_curve_starts_at_zero_and_never_predicts_less_loss_for_more_pruning() -> None:
    c = linear("a", 8, [6, 2, 4, 8], [1.0, 0.5, -0.2, 2.0], 100)  # unsorted, a noisy dip at K=4
    assert [(p.k, p.drop, p.macs, p.params) for p in c.points] == [
        (0, 0.0, 0, 0), (2, 0.5, 200, 20), (4, 0.5, 400, 40), (6, 1.0, 600, 60), (8, 2.0, 800, 80)]
    assert linear("b", 8, [2], [-0.3], 100).points[1].drop == 0.0  # never below the drop at K = 0


@pytest.mark.parametrize("ks", [[2, 2], [9], [-1]])
def test_a_curve_refuses_repeated_or_impossible_k(ks: list[int]) -> None:
    with pytest.raises(ValueError, match="K values must be distinct and within 0..8"):
        linear("a", 8, ks, [1.0] * len(ks), 100)


def test_allowed_keeps_are_multiples_of_round_to_above_min_keep() -> None:
    assert allowed_keeps(16, 8, 0.1) == [8]
    assert allowed_keeps(30, 1, 0.1) == list(range(3, 30))  # 0.1 * 30 = 3.0000000000000004 still allows 3
    assert allowed_keeps(8, 8, 0.0) == []  # the unit can only stay whole
    assert allowed_keeps(10, 4, 0.5) == [8]


def test_choices_move_measured_k_to_allowed_counts_and_interpolate_between_measured_points() -> None:
    c = linear("a", 16, [2, 6, 16], [1.0, 3.0, 8.0], 10)
    # round_to 4, min_keep 0.25: keep 4, 8 or 12, so K in {4, 8, 12}; K=2 -> 4, K=6 -> 4 (tie: smaller), 16 -> 12
    got = choices(c, round_to=4, min_keep=0.25)
    assert [(o.k, o.drop, o.macs, o.measured) for o in got] == [
        (0, 0.0, 0, True), (4, 2.0, 40, False), (12, 6.0, 120, False)]
    # round_to 1: the measured points themselves, except K=16, which would keep nothing (one channel stays)
    assert [(o.k, o.measured) for o in choices(c)] == [(0, True), (2, True), (6, True), (15, False)]
    assert [o.k for o in choices(c, min_keep=0.1)] == [0, 2, 6, 14]


# --- methods --------------------------------------------------------------------------------------------------

def brute_force(options: dict[str, list[Option]], kind: str, required: float) -> float | None:
    best = None
    for combo in itertools.product(*options.values()):
        if sum(o.saving(kind) for o in combo) >= required:
            drop = sum(o.drop for o in combo)
            best = drop if best is None else min(best, drop)
    return best


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_knapsack_is_exact_against_brute_force_on_random_instances(kind: str) -> None:
    rng = random.Random(12)
    feasible = 0
    for _ in range(300):
        options = random_options(rng, rng.randint(1, 4), rng.randint(1, 4))
        top = sum(opts[-1].saving(kind) for opts in options.values())
        required = rng.choice([rng.random() * top, top, top + 1, 0.0])
        best, got = brute_force(options, kind, required), knapsack(options, kind, required)
        if best is None:
            assert got is None
            continue
        feasible += 1
        assert sum(o.saving(kind) for o in got.values()) >= required  # the budget, never missed
        assert math.isclose(sum(o.drop for o in got.values()), best, abs_tol=1e-12)
        assert all(got[u] in options[u] for u in options)
    assert feasible > 200


def test_knapsack_beats_the_greedy_choice_on_a_hand_instance() -> None:
    # need 10 savings. a: K=2 saves 6 for 1.0, K=4 saves 10 for 3.0; b: K=2 saves 4 for 1.5, K=4 saves 8 for 4.0
    a = curve("a", 8, [2, 4], [1.0, 3.0], [6, 10], [0, 0])
    b = curve("b", 8, [2, 4], [1.5, 4.0], [4, 8], [0, 0])
    got = knapsack({"a": list(choices(a)), "b": list(choices(b))}, "macs", 10)
    assert {u: o.k for u, o in got.items()} == {"a": 2, "b": 2}  # 2.5 points, not a alone (3.0)


def test_threshold_takes_the_smallest_measured_drop_that_meets_the_budget() -> None:
    rng = random.Random(3)
    for _ in range(200):
        options = random_options(rng, rng.randint(1, 5), rng.randint(1, 4))
        top = sum(opts[-1].macs for opts in options.values())
        required = rng.random() * top
        got = threshold(options, "macs", required)
        ts = sorted({o.drop for opts in options.values() for o in opts})
        scan = next(t for t in ts if sum(max((o for o in opts if o.drop <= t), key=lambda o: o.k).macs
                                         for opts in options.values()) >= required)
        assert got == {u: max((o for o in opts if o.drop <= scan), key=lambda o: o.k) for u, opts in options.items()}
    assert threshold({"a": [Option(0, 0.0, 0, 0), Option(1, 1.0, 5, 0)]}, "macs", 6) is None


def test_uniform_takes_the_largest_kept_ratio_that_meets_the_budget() -> None:
    a = linear("a", 8, [2, 4, 6, 8], [0.1, 0.2, 0.3, 0.4], 100)  # 800 MACs at most
    b = linear("b", 16, [4, 8, 12, 16], [0.1, 0.2, 0.3, 0.4], 10)  # 160
    planner = Planner([a, b], "macs", keep=0.5, base_total=1920, method="uniform")  # save 960
    plan = planner.plan()
    # kept ratios tried from the top: 7/8 ... ; 3/8 keeps a at 3 (K=5, 500) and b at 6 (K=10, 100): too little;
    # 2/8 = 0.25: a K=6 (600), b K=12 (120): 720 < 960; 1/8: a K=7 (700), b K=14 (140): 840; 1/16: a K=7, b K=15
    assert planner.plan(required=720).ks == {"a": 6, "b": 12}
    assert plan is None  # min_keep 0 still keeps one channel: 700 + 150 < 960
    planner = Planner([a, b], "macs", keep=0.6, base_total=1920, method="uniform", round_to=2, min_keep=0.25)
    plan = planner.plan()  # save 768: keeps are even and >= 2 (a), >= 4 (b); ratio 0.25: a K=6, b K=12: 720
    assert plan is None
    plan = Planner([a, b], "macs", keep=0.65, base_total=1920, method="uniform", round_to=2,
                   min_keep=0.25).plan()  # save 672
    assert plan.ks == {"a": 6, "b": 12} and plan.saving == 720 and math.isclose(plan.predicted_drop, 0.6)


@pytest.mark.parametrize("method", ["knapsack", "threshold", "uniform"])
def test_fit_tightens_and_replans_until_the_counted_model_meets_the_budget(method: str) -> None:
    curves = [linear(f"u{i}", 16, [4, 8, 12], [0.5 * i, 1.0 * i + 1, 3.0 * i + 2], 100 + 10 * i) for i in range(4)]
    base = 20_000

    def overlap(ks: dict[str, int]) -> float:
        return 0.15 * sum(k * (100 + 10 * int(u[1:])) for u, k in ks.items())

    def count(ks: dict[str, int]) -> float:
        return base - sum(k * (100 + 10 * int(u[1:])) for u, k in ks.items()) + overlap(ks)

    planner = Planner(curves, "macs", keep=0.8, base_total=base, method=method)
    naive = planner.plan()
    assert count(naive.ks) > 0.8 * base  # the summed per-unit savings overstate the real saving
    fitted = planner.fit(count)
    assert fitted.counted_kept == count(fitted.ks) <= 0.8 * base
    assert fitted.required > planner.required
    assert Planner(curves, "macs", keep=0.05, base_total=base, method=method).fit(count) is None


def test_fit_bisects_when_a_tightening_step_overshoots() -> None:
    # required 3000 of 10000. Units (K 4/8/12): u0 saves 150 per channel, drops 0.3/1.8/3.2; u1 120, 1.3/2.0/3.7;
    # u2 150, 0.4/2.2/2.8. Neighbours pruned together share 50 per channel (the counted model keeps that).
    curves = [linear("u0", 16, [4, 8, 12], [0.3, 1.8, 3.2], 150), linear("u1", 16, [4, 8, 12], [1.3, 2.0, 3.7], 120),
              linear("u2", 16, [4, 8, 12], [0.4, 2.2, 2.8], 150)]
    per = {"u0": 150, "u1": 120, "u2": 150}

    def count(ks: dict) -> float:
        return 10_000 - sum(k * per[u] for u, k in ks.items()) + 50 * (min(ks["u0"], ks["u1"]) + min(ks["u1"], ks["u2"]))

    planner = Planner(curves, "macs", keep=0.7, base_total=10_000, method="knapsack")
    # (4, 8, 12) saves 3360 for 5.1 points but keeps 7240; the step asks for 3600: (12, 0, 12), 6.0 points, fits.
    # Bisecting between 3000 and 3600 finds (8, 4, 12): 3480 saved, 400 shared, keeps 6920, 5.9 points.
    assert planner.fit(count, resolution=1.0).ks == {"u0": 12, "u1": 0, "u2": 12}  # steps only
    fitted = planner.fit(count)
    assert fitted.ks == {"u0": 8, "u1": 4, "u2": 12} and math.isclose(fitted.predicted_drop, 5.9)
    assert fitted.counted_kept == 6920


def test_planner_names_the_methods() -> None:
    # the grid's choices are the registry's, and global (Torch-Pruning's, runner.planning.global_plan)
    assert (*METHODS, "global") == config_methods
    with pytest.raises(ValueError, match="unknown planning method 'greedy'; known: knapsack, threshold, uniform"):
        Planner([], "macs", 0.5, 1.0, "greedy")


# --- correction -----------------------------------------------------------------------------------------------

def interacting(plan: Plan) -> Measured:
    """A fake measurement: the drops add, plus 3 points whenever a and b are both pruned hard (K >= 8)."""
    extra = 3.0 if plan.ks.get("a", 0) >= 8 and plan.ks.get("b", 0) >= 8 else 0.0
    drop = plan.predicted_drop + extra
    return Measured(drop, drop - 0.5, drop + 0.5)


def test_correction_takes_the_move_whose_replan_measures_least() -> None:
    a = linear("a", 16, [4, 8, 12], [0.2, 0.4, 1.0], 100)
    b = linear("b", 16, [4, 8, 12], [0.1, 0.5, 4.0], 100)
    c = linear("c", 16, [4, 8, 12], [1.0, 1.5, 6.0], 100)
    planner = Planner([a, b, c], "macs", keep=0.5, base_total=4800, method="knapsack")  # save 2400: K sum 24
    plan = planner.plan()
    assert plan.ks == {"a": 8, "b": 8, "c": 8} and math.isclose(plan.predicted_drop, 2.4)
    calls = []

    def measure(p: Plan) -> Measured:
        calls.append(p.ks)
        return interacting(p)

    out = correct(plan, lambda caps: planner.plan(caps), measure)
    # measured 5.4 (low 4.9 > 2.4). Moves: cap a at 7 -> a 4, b 12, c 8 (predicted 5.7, measured 5.7);
    # cap b at 7 -> a 12, b 4, c 8 (2.6, 2.6); cap c at 7 -> a 12, b 8, c 4 (2.5 predicted, the cheapest by
    # prediction, but a and b still both at K >= 8: measured 5.5). Taken: cap b, accepted.
    assert calls == [{"a": 8, "b": 8, "c": 8}, {"a": 4, "b": 12, "c": 8}, {"a": 12, "b": 4, "c": 8},
                     {"a": 12, "b": 8, "c": 4}]
    assert [(m.unit, m.k_from, m.k_to) for m in out.moves] == [("b", 8, 4)]
    assert out.plan.ks == {"a": 12, "b": 4, "c": 8} and out.accepted and out.plan.caps == {"b": 7}
    assert math.isclose(out.first.drop, 5.4) and math.isclose(out.measured.drop, 2.6)


def two_units(a: int, b: int, predicted: float, caps: dict) -> Plan:
    """A plan of units a and b at K = a and b, its predicted drop split between them."""
    return Plan("knapsack", "macs", 0.0, {"a": Option(a, predicted / 2, 0, 0), "b": Option(b, predicted / 2, 0, 0)},
                caps=caps)


def scripted(predicted: dict, drops: dict):
    """`correct`'s replan and measure for hand-written re-plans: caps (sorted items) -> (a, b), predicted drop
    from `predicted[(a, b)]`, measured drop `drops[(a, b)]` with a half-width of 0.5."""
    by_caps = {caps: two_units(*ab, predicted[ab], dict(caps)) for caps, ab in REPLANS.items()}

    def replan(caps):
        return by_caps.get(tuple(sorted(caps.items())))

    def measure(p: Plan) -> Measured:
        d = drops[(p.ks["a"], p.ks["b"])]
        return Measured(d, d - 0.5, d + 0.5)

    return replan, measure


# a capped at 7 -> (4, 12); b at 7 -> (12, 4); a at 3 -> (3, 13); a at 7 and b at 11 -> (5, 11)
REPLANS = {(("a", 7),): (4, 12), (("b", 7),): (12, 4), (("a", 3),): (3, 13), (("a", 7), ("b", 11)): (5, 11)}


def test_correction_keeps_the_plan_that_measured_least_on_the_way() -> None:
    first = two_units(8, 8, 1.0, {})
    replan, measure = scripted({(4, 12): 2.0, (12, 4): 2.0, (3, 13): 3.0, (5, 11): 3.0},
                          {(8, 8): 10.0, (4, 12): 3.0, (12, 4): 4.0, (3, 13): 3.4, (5, 11): 5.0})
    out = correct(first, replan, measure)
    # first 10 > 1 + 0.5: move a (3.0, not accepted: 3.0 > 2 + 0.5); then a again (3.4 <= 3 + 0.5: accepted).
    # Kept: (4, 12), which measured 3.0, less than the accepted (3, 13)
    assert [(m.unit, m.k_from, m.k_to) for m in out.moves] == [("a", 8, 4), ("a", 4, 3)]
    assert out.accepted and out.last.ks == {"a": 3, "b": 13} and out.measured_plans == 5
    assert out.plan.ks == {"a": 4, "b": 12} and out.measured.drop == 3.0 and out.first.drop == 10.0


def test_correction_search_moves_past_an_accepted_plan_and_keeps_the_least_measured() -> None:
    first = two_units(8, 8, 10.0, {})
    replan, measure = scripted({(4, 12): 9.0, (12, 4): 9.0, (3, 13): 9.5, (5, 11): 9.5},
                          {(8, 8): 10.0, (4, 12): 6.0, (12, 4): 8.0, (3, 13): 7.0, (5, 11): 5.5})
    accepted = correct(first, replan, measure, max_moves=2)
    assert accepted.accepted and accepted.moves == () and accepted.plan.ks == {"a": 8, "b": 8}  # 10 <= 10 + 0.5
    out = correct(first, replan, measure, max_moves=2, search=True)
    # move 1: cap a (6.0) beats cap b (8.0); move 2 from (4, 12): cap a at 3 (7.0) or b at 11 (5.5): b
    assert [(m.unit, m.k_from, m.k_to) for m in out.moves] == [("a", 8, 4), ("b", 12, 11)]
    assert out.plan.ks == {"a": 5, "b": 11} and out.measured.drop == 5.5 and out.measured_plans == 5
    assert correct(first, replan, measure, max_moves=0, search=True).plan.ks == {"a": 8, "b": 8}


def test_correction_stops_when_no_move_is_left() -> None:
    a = linear("a", 16, [8], [0.4], 100)
    b = linear("b", 16, [8], [0.5], 100)
    planner = Planner([a, b], "macs", keep=0.5, base_total=3200, method="knapsack")  # needs both at K=8
    out = correct(planner.plan(), lambda caps: planner.plan(caps), interacting)
    assert not out.accepted and out.moves == () and out.plan.ks == {"a": 8, "b": 8}


def test_acceptance_is_measured_within_predicted_plus_the_interval() -> None:
    plan = Plan("knapsack", "macs", 0.0, {"a": Option(2, 1.0, 0, 0)})
    assert accepts(plan, Measured(1.5, 0.9, 2.1)) and accepts(plan, Measured(1.5, 1.0, 2.0))
    assert not accepts(plan, Measured(1.5, 1.1, 1.9))


# --- the plan section -----------------------------------------------------------------------------------------

def parse_plan(raw: dict, source: str) -> PlanConfig:
    return parse_grid({"plan": raw}, source).plan


def test_plan_section_defaults_and_issue_example() -> None:
    plan = parse_plan({"budgets": [{"macs": 0.5}, {"params": 0.6}], "methods": ["knapsack", "uniform"],
                       "round_to": 1, "min_keep": 0.1, "finetune": {"epochs": 2, "lr": 0.01}}, "g.yaml")
    assert [(b.kind, b.keep, b.label) for b in plan.budgets] == [("macs", 0.5, "macs0.5"), ("params", 0.6, "params0.6")]
    assert plan.finetune.epochs == 2 and plan.finetune.batch_size is None and plan.score_on == "eval"
    assert PlanConfig().methods == ["knapsack", "threshold", "uniform", "global"]
    assert parse_plan({"finetune": {"epochs": 0}}, "g").finetune.epochs == 0
    assert PlanConfig().correction == "accept" and parse_plan({"correction": "search"}, "g").correction == "search"
    with pytest.raises(InputError) as e:
        parse_plan({"correction": "greedy"}, "g.yaml")
    assert e.value.field == "plan.correction" and "'greedy'" in str(e.value) and "search" in str(e.value)


@pytest.mark.parametrize("raw, message", [
    ({"budgets": [{"macs": 0.5, "params": 0.6}]},
     "g.yaml: plan.budgets[0]: give exactly one of macs, params, latency: got {'macs': 0.5, 'params': 0.6}; "
     "allowed: {macs: 0.5}, {params: 0.6} or {latency: 0.6}; fix: write one budget per list item"),
    ({"budgets": [{"macs": 1.5}]},
     "g.yaml: plan.budgets[0].macs: out of range: got 1.5; allowed: a fraction of the base model to keep, 0 < f < 1; "
     "fix: change plan.budgets[0].macs in the grid file (or --set plan.budgets=...)"),
    ({"budgets": [{"macs": 0.5}, {"macs": 0.5}]},
     "g.yaml: plan.budgets: duplicate budget macs0.5: got [{'macs': 0.5}, {'macs': 0.5}]; allowed: each budget once; "
     "fix: remove the duplicate"),
    ({"methods": ["greedy"]},
     "g.yaml: plan.methods[0]: not allowed: got 'greedy'; allowed: 'knapsack', 'threshold', 'uniform' or 'global'; "
     "fix: change plan.methods[0] in the grid file (or --set plan.methods=...)"),
    ({"round_to": 0}, "g.yaml: plan.round_to: out of range: got 0; allowed: greater than or equal to 1; "
                      "fix: change plan.round_to in the grid file (or --set plan.round_to=...)"),
    ({"finetune": {"epoch": 2}}, "g.yaml: plan.finetune.epoch: unknown key: got 'epoch'; allowed: recipe, epochs, "
                                 "batch_size, optimizer, lr, momentum, nesterov, weight_decay, label_smoothing, "
                                 "schedule, normalise; fix: remove it or correct its spelling"),
])
def test_plan_section_errors_are_one_line(raw: dict, message: str) -> None:
    with pytest.raises(InputError) as e:
        parse_plan(raw, "g.yaml")
    assert str(e.value) == message


def test_a_round_to_no_unit_can_use_is_refused() -> None:
    check_round_to(8, 0.1, {"a": 16, "b": 8})
    with pytest.raises(InputError, match=r"plan.round_to: no unit can be pruned with this round_to and min_keep"):
        check_round_to(16, 0.1, {"a": 16, "b": 8})


# --- plans.csv and plan.json ----------------------------------------------------------------------------------

def row(budget: str, method: str, acc: float) -> dict:
    return {"budget": budget, "method": method, "macs_kept": 0.49, "params_kept": 0.7, "latency_ms_b1": 1.5,
            "latency_ms_b64": 20.0, "predicted_drop": 1.2, "accuracy_masked": acc, "accuracy_removed": acc,
            "accuracy_finetuned": acc + 3, "finetuned_low": acc + 1, "finetuned_high": acc + 5,
            "baseline_accuracy": 90.0, "measured_drop": 1.5}


def test_plans_csv_has_the_columns_in_order_and_reads_back(tmp_path) -> None:
    written = write_plans_csv(tmp_path, [row("macs0.5", "uniform", 80.0), row("macs0.5", "knapsack", 84.0)])
    assert list(written.columns) == [*COLUMNS, "measured_drop"]
    back = read_plans_csv(tmp_path)
    assert back["method"].tolist() == ["knapsack", "uniform"] and back["accuracy_finetuned"].tolist() == [87.0, 83.0]
    with pytest.raises(ValueError, match="plans.csv rows lack latency_ms_b64"):
        plans_table([{k: v for k, v in row("macs0.5", "uniform", 1.0).items() if k != "latency_ms_b64"}])


def test_plan_json_lives_in_its_budget_method_folder(tmp_path) -> None:
    folder = plan_folder(tmp_path, Budget(macs=0.5).label, "knapsack")
    assert folder == tmp_path / "plans" / "macs0.5-knapsack"
    write_plan_json(folder, {"units": [{"unit": "layer1.0.conv1", "k": 3}], "measured": {"drop": float("nan")}})
    assert read_plan_json(folder)["units"] == [{"unit": "layer1.0.conv1", "k": 3}]
