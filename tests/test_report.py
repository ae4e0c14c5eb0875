"""report.md from rows (runner.outputs.report): safe K from the interval's upper end, every criterion side by side,
random as mean and spread, the eval set's size, and the plain words the numbers need."""

from __future__ import annotations

import pytest

from runner.errors import InputError
from runner.outputs import figures, report
from runner.outputs.rankings import read_rankings, write_rankings

N = 1000


def row(layer: str, criterion: str, k: int, drop: float, high: float, repeat: int = 0, channels: int = 8,
        baseline: float = 90.0) -> dict:
    return {"layer": layer, "criterion": criterion, "k": k, "repeat": repeat, "fraction": k / channels,
            "channels": channels, "accuracy": baseline - drop, "baseline_accuracy": baseline, "accuracy_drop": drop,
            "drop_low": drop - 0.5, "drop_high": high, "device": "cpu", "dtype": "float32"}


def meta(**kw) -> report.ReportMeta:
    base = dict(name="t", eval_images=N, dataset="synthetic", calibration="100 held-out training images",
                arch="resnet18", width=0.125, target="output", checkpoint="m.pt", checkpoint_sha256="0" * 64,
                trained_accuracy="90.00%", versions={"torch": "x"}, wandb="off",
                roles={"layer1.0.conv1": "conv1", "layer1.0.conv2": "conv2"}, criteria=("l1_norm", "random"),
                random_repeats=3)
    return report.ReportMeta(**{**base, **kw})


# layer1.0.conv1 by l1_norm: the drop stays under 1 point up to K=4, but the upper end passes 1 at K=2
ROWS = [row("layer1.0.conv1", "l1_norm", 1, 0.2, 0.7), row("layer1.0.conv1", "l1_norm", 2, 0.5, 1.1),
        row("layer1.0.conv1", "l1_norm", 4, 0.9, 1.8), row("layer1.0.conv1", "l1_norm", 8, 30.0, 33.0)]
# its random orders: three draws per K
ROWS += [row("layer1.0.conv1", "random", k, d, d + 0.6, repeat=r) for k, draws in
         ((1, (0.1, 0.2, 0.3)), (2, (0.3, 0.2, 0.7)), (4, (2.0, 4.0, 6.0)), (8, (30.0, 30.0, 30.0)))
         for r, d in enumerate(draws)]
ROWS += [row("layer1.0.conv2", c, k, 0.0, 0.4) for c in ("l1_norm", "random") for k in (1, 2, 4, 8)]


def test_safe_k_uses_the_upper_end_of_the_interval():
    pts = report.curves(ROWS)
    l1 = next(v for t, v in pts.items() if t == ("layer1.0.conv1", "l1_norm"))
    assert report.safe_k(l1, 1.0)["k"] == 1  # the drop alone would say 4
    assert report.safe_k(l1, 5.0)["k"] == 4


def test_random_draws_are_averaged_with_their_spread_and_safe_only_if_every_draw_is():
    random = report.curves(ROWS)[("layer1.0.conv1", "random")]
    assert [p["k"] for p in random] == [1, 2, 4, 8] and {p["draws"] for p in random} == {3}
    k4 = random[2]
    assert k4["accuracy_drop"] == pytest.approx(4.0) and k4["drop_sd"] == pytest.approx(2.0)
    assert (k4["drop_min"], k4["drop_max"]) == (2.0, 6.0)
    assert (k4["drop_low"], k4["drop_high"]) == (1.5, 6.6)  # the union of the draws' intervals
    assert report.safe_k(random, 1.0)["k"] == 1  # K=2: one draw's upper end is 1.3


def test_report_words_and_tables(tmp_path):
    write_rankings(tmp_path / "rankings.json", {
        "layer1.0.conv1/l1_norm": {"order": [5, 3, 1, 0, 2, 4, 6, 7], "scores": [0.0] * 8},
        "layer1.0.conv2/l1_norm": {"order": [7, 6, 5, 4, 3, 2, 1, 0], "scores": [0.0] * 8},
        "layer1.0.conv1/random": {"order": [list(range(8))] * 3, "scores": [[0.0] * 8] * 3, "seeds": [1, 2, 3]}})
    text = report.write_report(ROWS, meta(holdout="unknown"), [], tmp_path, len(ROWS)).read_text(encoding="utf-8")
    assert "Baseline accuracy **90.00%** (cpu, float32) on 1,000 synthetic test images" in text
    assert "one image is worth 0.1 points" in text
    assert "**upper end** of that interval" in text and "Newcombe" in text
    # every criterion side by side; none picked per layer
    assert "| layer | channels | l1_norm: mean drop up to 50% (pts) | l1_norm: safe K < 1 / < 5 pts | random: safe " \
        "K < 1 / < 5 pts |" in text
    assert "best criterion" not in text
    # l1_norm's mean drop up to half the channels: (0.125 * 0.2 / 2 + 0.125 * 0.7 / 2 + 0.25 * 1.4 / 2) / 0.5 = 0.4625
    assert "| `layer1.0.conv1` | 8 | 0.46 | 1 (12%) / 4 (50%) | 1 (12%) / 2 (25%) |" in text
    assert "K=4: 4.00 ± 2.00 (2.00 to 6.00)" in text  # random: mean and spread per K
    assert "`layer1.0.conv1`: l1_norm K=1: 5" in text  # the channels a safe K removes, from rankings.json
    assert "`layer1.0.conv2`: l1_norm K=8: 7, 6, 5, 4, 3, 2, 1, 0" in text
    assert "random K=" not in text  # its orders differ per draw
    assert "**The calibration hold-out could not be checked**" in text
    assert "scatters the narrower conv's output back into it with an index add" in text and "`layer1.0.conv2`)" in text
    assert "mostly by BN's beta" not in text  # mean_activation is not swept here
    assert "pruned channels are flat" in text


@pytest.mark.parametrize("holdout, words", [
    ("foreign", "**The checkpoint is foreign** (`checkpoint.foreign: true`)"),
    ("checked", "among them (checked)"),
])
def test_report_says_where_the_calibration_images_come_from(tmp_path, holdout, words):
    text = report.write_report(ROWS, meta(holdout=holdout), [], tmp_path, len(ROWS)).read_text(encoding="utf-8")
    assert words in text


def test_report_words_for_input_pruning_mean_activation_and_the_seed_criterion(tmp_path):
    rows = [{**r, "criterion": "mean_activation"} for r in ROWS if r["criterion"] == "l1_norm"]
    text = report.write_report(rows, meta(criteria=("mean_activation",)), [], tmp_path, 4).read_text(encoding="utf-8")
    assert "it ranks channels mostly by BN's beta" in text
    text = report.write_report(rows, meta(criteria=("mean_activation",), target="input", seed_procedure="x y"), [],
                               tmp_path, 4).read_text(encoding="utf-8")
    assert "mostly by BN's beta" not in text and "index add" not in text  # output pruning only
    assert "input pruning leaves the layer's output channels all there, so none is flat" in text
    assert "`criterion: seed` here is **not the report's procedure**: x y." in text


def test_feature_map_captions_say_flat_only_for_output_pruning():
    assert "pruned channels are flat" in figures.layer_caption("output")
    assert "flat" not in figures.layer_caption("input").replace("no channel is flat", "")


def test_rankings_json_is_checked_on_reading(tmp_path):
    path = tmp_path / "rankings.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match=r"^rankings.json: not readable JSON \(JSONDecodeError\)"):
        read_rankings(path)
    path.write_text('{"conv1/l1_norm": {"order": [1, 0]}}', encoding="utf-8")
    with pytest.raises(InputError, match=r"^rankings.json: conv1/l1_norm: not an entry"):
        read_rankings(path)


def test_the_seed_criterion_is_the_reports_procedure_only_on_the_test_images_with_half_normalisation(tmp_path):
    from e2e_helpers import grid_dict

    from model.checkpoint import Checkpoint
    from runner.config import parse_grid
    from runner.job.sweep import _seed_procedure

    raw = grid_dict(tmp_path, sweep={"criteria": ["seed"], "target": "input", "layers": ["layer2.1.conv2"]})
    half = Checkpoint(None, {"mean": [0.5] * 3, "std": [0.5] * 3}, "0" * 64, "m.pt")
    stats = Checkpoint(None, {"mean": [0.4, 0.5, 0.5], "std": [0.2] * 3}, "0" * 64, "m.pt")
    assert _seed_procedure(parse_grid({**raw, "sweep": {**raw["sweep"], "calibration": "test"}}, "g"), half) is None
    assert _seed_procedure(parse_grid(raw, "g"), half) == (
        "it ranks on held-out training images, while the report ranked on the test set (sweep.calibration: test)")
    assert _seed_procedure(parse_grid({**raw, "sweep": {**raw["sweep"], "calibration": "test"}}, "g"), stats) == (
        "the checkpoint is not normalised with mean = std = 0.5 as the report's was (recipe: seed)")
    raw["sweep"].update(criteria=["l1_norm"])
    assert _seed_procedure(parse_grid(raw, "g"), stats) is None  # not asked for


def test_trial_summary_takes_random_draws_as_their_mean_and_safe_only_where_every_draw_is():
    random = [r for r in ROWS if (r["layer"], r["criterion"]) == ("layer1.0.conv1", "random")]
    s = report.trial_summary(random)
    assert (s["points"], s["safe_k_1pt"], s["safe_k_5pt"]) == (12, 1, 2)  # 4 K x 3 draws; K=2: a draw reaches 1.3
    assert s["accuracy_at_50pct"] == pytest.approx(90.0 - 4.0)  # the mean of the three draws at K=4


def test_a_report_written_after_a_prune_job_keeps_its_plans_section(tmp_path) -> None:
    """The sweep's report.md is written again on `sweep --resume`: the plans section comes back from plans.csv and
    the prune job's record (plans/job.json), and only when both are there."""
    from runner.outputs import plans

    assert "## Plans" not in report.write_report(ROWS, meta(), [], tmp_path, len(ROWS)).read_text(encoding="utf-8")
    row = {"budget": "macs0.5", "method": "uniform", "macs_kept": 0.49, "params_kept": 0.5, "latency_ms_b1": 1.0,
           "latency_ms_b64": 9.0, "predicted_drop": 1.5, "accuracy_masked": 80.0, "accuracy_removed": 80.0,
           "accuracy_finetuned": 85.0, "finetuned_low": 84.0, "finetuned_high": 86.0, "baseline_accuracy": 90.0}
    plans.write_plans_csv(tmp_path, [row])
    assert plans.saved_section(tmp_path) == []  # no job record: not a prune job's plans.csv
    words = {"criterion": "l1_norm", "unit": "group", "chosen_on": "the eval images", "scored_on": "the test images",
             "left_out": {}, "units": 12, "finetune": None, "base_macs": 1000, "base_params": 100}
    plans.write_job(tmp_path, {"job_id": "x", "words": words})
    text = report.write_report(ROWS, meta(), [], tmp_path, len(ROWS)).read_text(encoding="utf-8")
    assert text.count("## Plans: a smaller model under a budget") == 1 and "## Which layers" in text
    assert "| macs0.5 | uniform | 0.490 | 0.500 |" in text and text.endswith(plans.END + "\n")
    assert "plan.correction: search" not in text
    searched = "\n".join(plans.plans_section(plans.read_plans_csv(tmp_path), {**words, "correction": "search"}))
    assert "with `plan.correction: search` every plan took all the moves it could" in searched


# --- the layer table's order, and the near-chance warning --------------------------------------------------

def test_drop_to_half_is_the_mean_drop_over_the_first_half_of_the_channels():
    pts = [{"fraction": 0.25, "accuracy_drop": 1.0}, {"fraction": 0.75, "accuracy_drop": 3.0},
           {"fraction": 1.0, "accuracy_drop": 80.0}]
    # (0.25 * (0 + 1) / 2 + 0.25 * (1 + 2) / 2) / 0.5, the drop at 50% read off the line from 25% to 75%
    assert report.drop_to_half(pts) == 1.0
    assert report.drop_to_half(pts[:1]) == 0.5  # measured up to 25% only: the mean over what was measured
    assert report.drop_to_half([]) == 0.0


# `late` is the demo's layer4.1.conv1: the largest drop at K = all channels, so the largest mean over every K,
# yet safe under 1 point up to a quarter of its channels; `early` is past 1 point at its first K
ORDER = [row("early", "l1_norm", k, d, d + 0.5) for k, d in ((1, 0.6), (2, 2.0), (4, 4.0), (8, 10.0))]
ORDER += [row("late", "l1_norm", k, d, d + 0.5) for k, d in ((1, 0.1), (2, 0.2), (4, 3.0), (8, 80.0))]
ORDER += [row("tie", "l1_norm", k, d, d + 0.5) for k, d in ((1, 0.1), (2, 0.3), (4, 6.0), (8, 12.0))]


def test_layers_are_ordered_by_the_plan_criterions_safe_fraction_then_drop_up_to_half(tmp_path):
    assert [s["layer"] for s in report.layer_summary(ORDER, "l1_norm")] == ["early", "tie", "late"]
    text = report.write_report(ORDER, meta(criteria=("l1_norm",), order_by="l1_norm", roles={}), [], tmp_path,
                               len(ORDER)).read_text(encoding="utf-8")
    assert ("Order: most sensitive first by `l1_norm` (the criterion `prune` plans with): the smallest safe K "
            "under 1 point as a fraction of the layer's channels first; ties by the larger mean drop up to 50% of "
            "the channels (the area under the drop curve from 0 to 50%, divided by 0.5).") in text
    table = [line for line in text.splitlines() if line.startswith("| `")]
    # early: no safe K under 1 point; tie and late: 2 (25%), and tie's mean drop up to 50% is the larger:
    # (0.125 * 0.1 / 2 + 0.125 * 0.4 / 2 + 0.25 * 6.3 / 2) / 0.5 = 1.6375 against (... 0.25 * 3.2 / 2) / 0.5 = 0.85
    assert table == ["| `early` | 8 | 1.90 | none / 4 (50%) |", "| `tie` | 8 | 1.64 | 2 (25%) / 2 (25%) |",
                     "| `late` | 8 | 0.85 | 2 (25%) / 4 (50%) |"]


def test_a_base_accuracy_near_chance_is_a_warning_in_the_report(tmp_path):
    words = ("the base accuracy 12.00% is within 5 points of chance (10.00% for 10 classes): the network has learnt "
             "little, so its curves say little about a trained one; train the checkpoint further "
             "(checkpoint.train.epochs) or point checkpoint.path at a trained one")
    assert report.near_chance(12.0, 10) == words
    assert report.near_chance(15.0, 10) is not None and report.near_chance(15.01, 10) is None  # chance + 5 points
    assert report.near_chance(5.1, 1000) is not None and report.near_chance(float("nan"), 10) is None
    low = [{**r, "baseline_accuracy": 12.0, "accuracy": 12.0 - r["accuracy_drop"]} for r in ROWS]
    text = report.write_report(low, meta(classes=10), [], tmp_path, len(low)).read_text(encoding="utf-8")
    assert f"**Warning: {words}.**" in text
    text = report.write_report(ROWS, meta(classes=10), [], tmp_path, len(ROWS)).read_text(encoding="utf-8")
    assert "Warning" not in text  # 90% on 10 classes


def test_plurals_say_one_point_and_one_epoch(tmp_path):
    from runner.errors import plural

    assert [plural(1, "point"), plural(2, "point"), plural(1_000, "image"), plural(1, "class", "classes"),
            plural(10, "class", "classes")] == ["1 point", "2 points", "1,000 images", "1 class", "10 classes"]
    text = report.write_report(ROWS, meta(eval_images=100), [], tmp_path, len(ROWS)).read_text(encoding="utf-8")
    assert "one image is worth 1 point. " in text
