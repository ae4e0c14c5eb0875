"""The global baseline (Torch-Pruning's global pruning as a plan) and `prune-sweep validate`'s parts: random plans
fitted to a budget, predicted drops, the rank correlations against scipy, validation.csv; the job's input checks
and dry run; and (slow) the job end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from e2e_helpers import e2e, grid_dict, write_grid
from scipy import stats
from torch import nn

from model.resnet import ResNet18
from runner.errors import InputError
from runner.outputs import validation as out
from runner.planning.curves import allowed_keeps, curve
from runner.planning.global_plan import fit_global, plan_methods, prune_globally, quick_counts, skip_reason
from runner.planning.removal import counts, pruned_copy
from runner.planning.validation import predicted_drop, random_plan


def _trained_like(width: float = 0.125, seed: int = 0) -> nn.Module:
    """A ResNet-18 whose weights and BN statistics are random but not degenerate (channels differ in norm)."""
    torch.manual_seed(seed)
    model = ResNet18(width=width).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    return model


# --- global ---------------------------------------------------------------------------------------------------

def test_the_global_removal_rebuilds_the_model_torch_pruning_pruned() -> None:
    base = _trained_like()
    theirs = copy.deepcopy(base)
    removal = prune_globally(theirs, "l1_norm", 0.3, 32)
    ours = pruned_copy(base, removal, 32)
    assert removal and sum(len(v) for v in removal.values()) > 0
    a, b = theirs.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(theirs.eval()(x), ours.eval()(x))
    assert base.linear.out_features == theirs.linear.out_features == 10  # the output layer is left alone


def test_the_global_ratio_is_the_smallest_that_meets_the_budget_counted() -> None:
    base = _trained_like()
    full = counts(base, 32)
    g = fit_global(base, "l1_norm", "macs", 0.6, 32)
    assert g.counted.macs <= 0.6 * full.macs
    assert counts(pruned_copy(base, g.removal, 32), 32) == g.counted
    less = copy.deepcopy(base)
    prune_globally(less, "l1_norm", g.ratio - 2e-4, 32)
    assert counts(less, 32).macs > 0.6 * full.macs  # a hair less pruning misses the budget
    p = fit_global(base, "l1_norm", "params", 0.5, 32)
    assert p.counted.params <= 0.5 * full.params



def test_a_latency_budget_fits_the_global_ratio_on_the_measured_amount() -> None:
    # a fake timer: a pruned model's "ms" are its params over 1,000, so the fit is deterministic and checkable
    base = _trained_like()
    timed: list[float] = []

    def ms(model: torch.nn.Module) -> float:
        timed.append(ratio_params := sum(p.numel() for p in model.parameters()) / 1000)
        return ratio_params

    base_ms = sum(p.numel() for p in base.parameters()) / 1000
    g = fit_global(base, "l1_norm", "latency", 0.5, 32, amount=ms, base_amount=base_ms)
    assert g.kept <= 0.5 * base_ms and g.kept == g.counted.params / 1000
    assert g.tries == len(timed) <= 16  # every ratio tried was timed once, within the cap
    exact = fit_global(base, "l1_norm", "params", 0.5, 32)  # the counted fit, to 1e-4
    assert exact.ratio <= g.ratio <= exact.ratio + 0.01 + 1e-9  # the measured fit stops within 0.01 above it
    less = copy.deepcopy(base)
    prune_globally(less, "l1_norm", g.ratio - 0.01, 32)
    assert counts(less, 32).params > 0.5 * counts(base, 32).params

def test_global_names_groups_by_the_plan_units() -> None:
    base = _trained_like()
    units = ["conv1", "layer1.0.conv1", "layer2.0.conv2", "layer4.1.conv1"]
    g = fit_global(base, "l1_norm", "macs", 0.6, 32, units=units)
    plain = fit_global(base, "l1_norm", "macs", 0.6, 32)
    assert g.counted == plain.counted and g.ratio == plain.ratio
    # the residual stream of stage 2 is rooted elsewhere by Torch-Pruning; renamed to the unit's conv
    assert "layer2.0.conv2" in g.removal and set(units) <= set(g.removal) | {u for u in units if u not in g.removal}
    assert sum(map(len, g.removal.values())) == sum(map(len, plain.removal.values()))


def test_quick_counts_equal_the_flop_counter_on_pruned_and_foreign_models() -> None:
    import torchvision

    base = _trained_like()
    pruned = pruned_copy(base, {"conv1": [0, 3], "layer2.0.conv1": [1, 2, 5], "layer4.0.conv2": [7]}, 32)
    mobile = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    for model in (base, pruned, mobile):
        assert quick_counts(model, 32) == counts(model, 32)


def test_global_needs_a_torch_pruning_importance() -> None:
    assert skip_reason("l1_norm") is None and skip_reason("taylor") is None
    assert plan_methods(["knapsack", "global"], True, "l1_norm") == (["knapsack", "global"], {})
    methods, skipped = plan_methods(["knapsack", "uniform", "global"], False, "mean_activation")
    assert methods == ["knapsack", "uniform"] and "no Torch-Pruning importance" in skipped["global"]
    with pytest.raises(InputError) as e:
        plan_methods(["knapsack", "global"], True, "mean_activation")
    assert str(e.value) == (
        "plan.methods: plan criterion mean_activation has no Torch-Pruning importance (global pruning needs one of "
        "l1_norm, l2_norm, bn_scale, taylor): got 'global'; allowed: plan.criterion one of l1_norm, l2_norm, "
        "bn_scale, taylor with global; fix: remove global from plan.methods, or plan with one of those criteria")


def test_taylor_global_pruning_uses_gradients() -> None:
    base = _trained_like()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def gradients(model: nn.Module) -> None:
        nn.functional.cross_entropy(model(x), y).backward()

    g = fit_global(base, "taylor", "macs", 0.7, 32, gradients)
    assert g.counted.macs <= 0.7 * counts(base, 32).macs
    with pytest.raises(ValueError, match="needs gradients"):
        prune_globally(copy.deepcopy(base), "taylor", 0.3, 32)


# --- random plans and predictions -----------------------------------------------------------------------------

def _curves():
    return [curve("a", 8, [2, 4, 6], [1.0, 3.0, 9.0], [20, 40, 60], [2, 4, 6]),
            curve("b", 16, [4, 8, 12], [0.5, 1.0, 4.0], [40, 80, 120], [4, 8, 12]),
            curve("c", 4, [1, 2, 3], [2.0, 2.5, 7.0], [30, 60, 90], [3, 6, 9])]


def test_a_random_plan_is_the_smallest_scale_of_its_ratios_that_meets_the_budget() -> None:
    curves = _curves()
    total = 400.0

    def count(ks):  # kept MACs: the savings add up (the real job counts the pruned model)
        return total - sum(c.at(ks[c.unit]).macs if ks[c.unit] <= c.kmax else 0 for c in curves)

    ratios = [0.9, 0.3, 0.6]
    ks = random_plan(curves, ratios, 300.0, count)
    assert count(ks) <= 300.0
    # the same rule scanned on a fine grid of scales: the first scale that fits gives the same plan
    options = {c.unit: [0] + [c.channels - k for k in allowed_keeps(c.channels, 1, 0.0) if c.channels - k <= c.kmax]
               for c in curves}
    for t in np.linspace(0, 1 / 0.3, 20001):
        scan = {c.unit: max(k for k in options[c.unit] if k <= min(1.0, t * r) * max(options[c.unit]) + 1e-9)
                for c, r in zip(curves, ratios)}
        if count(scan) <= 300.0:
            break
    assert scan == ks
    assert random_plan(curves, ratios, 100.0, count) is None  # every unit at its largest K still keeps 130
    assert predicted_drop(ks, curves) == pytest.approx(sum(c.at(ks[c.unit]).drop for c in curves))
    assert predicted_drop({"a": 7, "zz": 3}, curves) == 9.0  # beyond the measured range: the last drop


# --- correlations and validation.csv --------------------------------------------------------------------------

def test_rank_correlations_agree_with_scipy_ties_included() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.integers(0, 5, 12).astype(float)
        y = x + rng.integers(0, 4, 12)
        assert out.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert out.kendall(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert math.isnan(out.spearman([1, 1, 1], [1, 2, 3])) and math.isnan(out.kendall([1, 2, 3], [2, 2, 2]))


def _rows(n: int = 12) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        tuned = 70 + rng.random() * 4
        rows.append({"plan": out.random_name("macs0.5", i), "budget": "macs0.5", "method": "random",
                     "macs_kept": 0.49, "params_kept": 0.5,
                     "predicted_drop_plain": rng.random() * 50, "predicted_drop_recalibrated": 80 - tuned,
                     "accuracy_masked": rng.random() * 20, "accuracy_masked_low": 0, "accuracy_masked_high": 30,
                     "accuracy_recalibrated": tuned - 15 + (i % 2), "accuracy_recalibrated_low": 0,
                     "accuracy_recalibrated_high": 90, "accuracy_finetuned": tuned,
                     "accuracy_finetuned_low": tuned - 1, "accuracy_finetuned_high": tuned + 1})
    return rows


def test_correlations_flip_drops_and_come_with_bootstrap_intervals(tmp_path) -> None:
    rows = _rows()
    rows.append({**rows[0], "plan": "macs0.5-knapsack", "method": "knapsack", "predicted_drop_recalibrated": 99})
    table = out.write_validation_csv(tmp_path, rows)
    assert list(pd.read_csv(tmp_path / "validation.csv").columns[:len(out.COLUMNS)]) == list(out.COLUMNS)
    by = {c["predictor"]: c for c in out.correlations(table)}
    # a drop that falls exactly as fine-tuned accuracy rises is a perfect predictor (+1), the methods' plans aside
    assert by["predicted_drop_recalibrated"]["spearman"] == 1.0 and by["predicted_drop_recalibrated"]["plans"] == 12
    assert by["predicted_drop_recalibrated"]["kendall"] == 1.0
    assert by["predicted_drop_recalibrated"]["spearman_low"] == 1.0
    c = by["accuracy_masked"]
    assert c["spearman_low"] <= c["spearman"] <= c["spearman_high"] and c["kendall_low"] <= c["kendall_high"]
    random = table[table["method"] == "random"]
    assert c["spearman"] == pytest.approx(stats.spearmanr(random["accuracy_masked"],
                                                          random["accuracy_finetuned"]).statistic)
    assert out.summary_values(out.correlations(table))["macs0.5/accuracy_masked/spearman"] == c["spearman"]
    with pytest.raises(ValueError, match="lack accuracy_finetuned"):
        out.validation_table([{k: v for k, v in rows[0].items() if k != "accuracy_finetuned"}])


def test_the_report_section_and_figure_say_what_was_measured(tmp_path) -> None:
    rows = _rows()
    rows.append({**rows[0], "plan": "macs0.5-global", "method": "global"})
    table = out.validation_table(rows)
    corr = out.correlations(table)
    versus = [{"plan": "macs0.5-knapsack", "other": "macs0.5-global", "difference": 0.5, "low": -0.25, "high": 1.25}]
    words = {"random_plans": 12, "criterion": "l1_norm", "finetune": "1 epochs", "chosen_on": "eval images",
             "scored_on": "test images", "bn_images": 512, "cpu": {"fine-tuning (trials)": 1234.0},
             "wall": {"fine-tuning": 99.0}, "bn_gain": {"mean_gain": 31.5, "points": 40, "raised": 0.95, "least": 0.5}}
    (tmp_path / "report.md").write_text("# the sweep\n")
    out.write_validation_section(tmp_path, table, corr, versus, words)
    out.write_validation_section(tmp_path, table, corr, versus, words)  # replaced, not appended
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# the sweep") and text.count("## Validation") == 1
    assert "| macs0.5 | predicted drop, recalibrated curves (`predicted_drop_recalibrated`) | 12 | +1.00 [+1.00, " \
        "+1.00] | +1.00 [+1.00, +1.00] |" in text
    assert "- macs0.5-knapsack minus macs0.5-global: +0.50 [-0.25, +1.25]" in text
    assert "(40 points): one-shot accuracy +31.50 points on average (raised at 95% of them)" in text
    assert "CPU seconds fine-tuning (trials) 1,234" in text
    assert (tmp_path / "plots" / "validation.png").stat().st_size > 10_000


def test_the_adaptive_bn_gain_counts_points_that_prune_at_least_half_a_unit() -> None:
    rows = [{"criterion": "l1_norm", "fraction": f, "accuracy": a, "accuracy_recalibrated": r}
            for f, a, r in [(0.25, 80.0, 10.0), (0.5, 20.0, 60.0), (0.75, 10.0, 40.0), (1.0, 10.0, 5.0)]]
    rows += [{"criterion": "random", "fraction": 0.5, "accuracy": 10.0, "accuracy_recalibrated": 90.0},
             {"criterion": "l1_norm", "fraction": 0.75, "accuracy": 10.0, "accuracy_recalibrated": None}]
    assert out.bn_gain(rows, "l1_norm") == {"mean_gain": 65 / 3, "points": 3, "raised": 2 / 3, "least": 0.5}
    assert out.bn_gain(rows[:1], "l1_norm", 0.5) is None


# --- the job --------------------------------------------------------------------------------------------------

def test_validate_dry_run_says_what_it_would_run(tmp_path, cli) -> None:
    grid = grid_dict(tmp_path, sweep={"unit": "group", "criteria": ["l1_norm"]}, validate={"bn_images": 50},
                     plan={"finetune": {"epochs": 1}})
    run = cli(["--grid", str(write_grid(tmp_path / "g.yaml", grid)), "--dry-run"], cwd=tmp_path, command="validate")
    assert run.returncode == 0, run.stderr
    assert ("validate: per budget (macs0.5) 16 random plans (seed 0) + the plans of knapsack, threshold, uniform, "
            "global = 20 plans, criterion l1_norm, unit group") in run.stdout
    assert "adaptive BN on 50 calibration images, then fine-tuned 1 epochs (lr 0.01)" in run.stdout


@pytest.mark.parametrize("sets, message", [
    ([], "validate.bn_images: more than the 100 calibration hold-out images: got 512"),
    (["validate.bn_images=50", "plan.finetune.epochs=0"], "plan.finetune.epochs: validation compares predictions"),
    (["validate.bn_images=50", "sweep.criteria=[mean_activation]", "plan.methods=[knapsack, global]"],
     "plan.methods: plan criterion mean_activation has no Torch-Pruning importance"),
    (["validate.random_plans=2"], "validate.random_plans: out of range: got 2"),
])
def test_bad_validate_input_is_one_line_and_exit_2(tmp_path, cli, sets, message) -> None:
    path = write_grid(tmp_path / "g.yaml", grid_dict(tmp_path))
    run = cli(["--grid", str(path), "--dry-run", *(x for s in sets for x in ("--set", s))], cwd=tmp_path,
              command="validate")
    assert run.returncode == 2 and len(run.err_lines) == 1 and message in run.err_lines[0], run.stderr


def test_a_default_global_without_importance_is_skipped_with_a_line(tmp_path, cli) -> None:
    path = write_grid(tmp_path / "g.yaml", grid_dict(tmp_path, sweep={"criteria": ["mean_activation"]}))
    run = cli(["--grid", str(path), "--dry-run"], cwd=tmp_path, command="prune")
    assert run.returncode == 0, run.stderr
    assert "x methods knapsack, threshold, uniform (3 plans)" in run.stdout
    assert "skipped: global: plan criterion mean_activation has no Torch-Pruning importance" in run.stdout


def test_a_validation_refuses_a_grid_that_changes_what_its_plans_were_made_under(tmp_path) -> None:
    from runner.config import parse_grid
    from runner.job.validate import JOB, check_same, identity_of

    def grid(**changes):
        raw = grid_dict(tmp_path, plan={"budgets": [{"macs": 0.6}], "methods": ["knapsack", "uniform"]})
        for section, values in changes.items():
            raw[section] = {**raw.get(section, {}), **values}
        return parse_grid(raw, "g.yaml")

    root = tmp_path / "validation"
    check_same(grid(), root, identity_of(grid(), "abc"))  # nothing recorded yet
    root.mkdir()
    (root / JOB).write_text(json.dumps(identity_of(grid(), "abc")))
    for same in (grid(), grid(validate={"random_plans": 20}), grid(plan={"methods": ["knapsack", "uniform", "global"]})):
        check_same(same, root, identity_of(same, "abc"))  # the same, or adds random plans or a method
    for changed, words in ((grid(plan={"correction": "search"}), "plan.correction: 'accept' then, 'search' now"),
                           (grid(validate={"random_plans": 8}), "validate.random_plans: 16 then, 8 now"),
                           (grid(validate={"seed": 1}), "validate.seed: 0 then, 1 now")):
        with pytest.raises(InputError) as e:
            check_same(changed, root, identity_of(changed, "abc"))
        assert e.value.field == "--grid" and words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="checkpoint_sha256: 'abc' then, 'abd' now"):
        check_same(grid(), root, identity_of(grid(), "abd"))


@pytest.mark.slow
def test_validate_end_to_end(ray_session, sweep_checkpoint, tmp_path) -> None:
    """A tiny sweep by groups, 4 random plans and the four methods' plans under macs 0.7, each fine-tuned one
    epoch on 200 images, scored on the 50 test images the sweep did not evaluate; then resumed with nothing to do."""
    from runner.job.sweep import Options
    from runner.job.validate import run_validate
    from runner.planning.export import open_pruned

    grid = grid_dict(tmp_path, e2e(sweep_checkpoint), name="valid",
                     sweep={"layers": "all", "unit": "group", "k": {"fractions": [0.25, 0.5, 0.75]},
                            "criteria": ["l1_norm"]},
                     plan={"budgets": [{"macs": 0.7}], "max_corrections": 1, "score_on": "test",
                           "finetune": {"epochs": 1, "batch_size": 100}},
                     validate={"random_plans": 4, "bn_images": 100})
    grid["data"]["train_size"] = 200
    path = write_grid(tmp_path / "valid.yaml", grid)
    outcome = run_validate(Options(str(path)))
    assert outcome.failed == []
    t = pd.read_csv(outcome.folder / "validation.csv")
    assert t["plan"].tolist() == [f"random-macs0.7-0{i}" for i in range(4)] + [
        f"macs0.7-{m}" for m in ("knapsack", "threshold", "uniform", "global")]
    assert (t["macs_kept"] <= 0.7).all() and t["accuracy_finetuned"].notna().all()
    assert t["predicted_drop_recalibrated"].isna().all()  # this sweep has no recalibrated curves
    for r in t.to_dict("records"):
        folder = Path(r["folder"])
        verdicts = np.load(folder / "correct_finetuned.npy")
        assert len(verdicts) == 50 and r["accuracy_finetuned"] == pytest.approx(100 * verdicts.mean())
        kept = counts(open_pruned(folder / "pruned.pt").model, 32).macs / counts(ResNet18(width=0.125), 32).macs
        assert r["macs_kept"] == pytest.approx(kept)
        assert json.loads((folder / "measured.json").read_text())["plan"] == r["plan"]
    text = (outcome.folder / "report.md").read_text()
    assert "## Validation: do the curves rank plans" in text and "macs0.7-knapsack minus macs0.7-global" in text
    assert (outcome.folder / "plots" / "validation.png").stat().st_size > 10_000
    assert {c["predictor"] for c in outcome.correlations} == set(out.PREDICTORS)
    again = run_validate(Options(str(path)))  # resumed: nothing measured or fine-tuned again
    assert again.cpu["fine-tuning (driver)"] < 1.0
    tuned = pd.read_csv(again.folder / "validation.csv")["accuracy_finetuned"]
    assert tuned.tolist() == t["accuracy_finetuned"].tolist()
    write_grid(path, {**grid, "plan": {**grid["plan"], "correction": "search"}})  # other plans: refused, unread
    with pytest.raises(InputError, match="plan.correction: 'accept' then, 'search' now"):
        run_validate(Options(str(path)))
