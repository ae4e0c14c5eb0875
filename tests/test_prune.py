"""`prune-sweep prune` end to end, in process on the session's Ray: a tiny sweep by groups, four plans under a
MACs budget, removal, fine-tuning trials, the files read back; then what the files say checked against
independent recounts and reloads. Also the job's input checks, and `prune-sweep score`."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from e2e_helpers import artifacts, cli_env, e2e, grid_dict, history, manifest_paths, runs_by_name, write_grid

from model.resnet import ResNet18
from runner.config import parse_grid
from runner.errors import InputError
from runner.planning import latency as latency_module
from runner.planning.export import open_pruned
from runner.planning.removal import counts
from runner.planning.units import plan_criterion, plan_units, unit_curves

BUDGET = 0.7


@pytest.fixture(scope="module")
def planned(ray_session, sweep_checkpoint, tmp_path_factory) -> SimpleNamespace:
    """One prune job: 12 groups x 2 K, l1_norm; budget macs 0.7 by all four methods; one epoch of fine-tuning
    on 200 images; scored on the 50 test images the sweep did not evaluate."""
    import runner.job.plan as prune
    from runner.api import prune as prune_api

    tmp = tmp_path_factory.mktemp("prune")
    grid = grid_dict(tmp, e2e(sweep_checkpoint), name="planned",
                     sweep={"layers": "all", "unit": "group", "k": {"fractions": [0.25, 0.5]},
                            "criteria": ["l1_norm"]},
                     plan={"budgets": [{"macs": BUDGET}], "max_corrections": 2, "score_on": "test",
                           "finetune": {"epochs": 1, "batch_size": 100}})
    grid["data"]["train_size"] = 200
    path = write_grid(tmp / "planned.yaml", grid)
    quick = functools.partial(latency_module.latency, warmup=1, min_runs=3, min_seconds=0.0)
    original, prune.latency = prune.latency, quick  # timing is not what is tested here
    try:
        table = prune_api(path)  # the notebook API: the same job as the command, plans.csv as a DataFrame
    finally:
        prune.latency = original
    folder = Path(table.attrs["folder"])
    return SimpleNamespace(failed=table.attrs["failed"], folder=folder, path=path, grid=grid, table=table)


def test_every_plan_is_made_fine_tuned_and_verified(planned) -> None:
    t = planned.table
    assert planned.failed == []
    assert planned.table.equals(pd.read_csv(planned.folder / "plans.csv"))
    assert sorted(t["method"]) == ["global", "knapsack", "threshold", "uniform"] and set(t["budget"]) == {"macs0.7"}
    assert (t["macs_kept"] <= BUDGET).all() and (t["macs_kept"] > 0).all()
    # the masked plan and the physically pruned model agree image by image; pruned.pt read back by our loader
    # gives the fine-tuned accuracy; the ONNX file predicts every image as torch does
    assert (t["accuracy_masked"] == t["accuracy_removed"]).all() and (t["masked_vs_removed_differ"] == 0).all()
    assert (t["accuracy_final"] == t["accuracy_finetuned"]).all()
    assert (t["onnx_differ"] == 0).all() and (t["accuracy_onnx"] == t["accuracy_finetuned"]).all()
    assert ((t["finetuned_low"] <= t["accuracy_finetuned"]) & (t["accuracy_finetuned"] <= t["finetuned_high"])).all()
    assert (t["scored_images"] == 50).all()  # 200 test images, 150 evaluated by the sweep
    assert (t["scored_classes"] == 10).all()  # every class among them
    assert (t[t["method"].isin(["uniform", "global"])]["corrections"] == 0).all()  # baselines are never corrected
    others = t[t["method"] != "uniform"]
    assert others["vs_uniform"].notna().all() and t[t["method"] == "uniform"]["vs_uniform"].isna().all()


def test_counts_come_from_the_pruned_model_itself(planned) -> None:
    base = counts(ResNet18(width=0.125).eval(), 32)
    for row in planned.table.to_dict("records"):
        opened = open_pruned(Path(row["folder"]) / "pruned.pt")
        mine = counts(opened.model, 32)
        assert (mine.macs, mine.params) == (row["macs"], row["params"])
        assert row["macs_kept"] == pytest.approx(mine.macs / base.macs, rel=1e-12)
        assert row["params_kept"] == pytest.approx(mine.params / base.params, rel=1e-12)


def test_plan_json_says_what_each_unit_keeps_and_which_channels_went(planned) -> None:
    for row in planned.table.to_dict("records"):
        plan = json.loads((Path(row["folder"]) / "plan.json").read_text())
        assert plan["method"] == row["method"] and plan["macs_kept"] == pytest.approx(row["macs_kept"])
        assert plan["predicted_drop"] == pytest.approx(row["predicted_drop"])
        assert "never evaluated" in plan["scored_on"] and "eval images" in plan["chosen_on"]
        opened = open_pruned(Path(row["folder"]) / "pruned.pt")
        for unit in plan["units"]:
            assert 0 <= unit["k"] < unit["channels"] and unit["kept"] == unit["channels"] - unit["k"]
            assert len(unit["removed"]) == unit["k"] == len(opened.removal.get(unit["unit"], []))
        assert opened.meta["finetuned"] is True


def test_the_report_gains_a_plans_section_and_plot(planned) -> None:
    text = (planned.folder / "report.md").read_text()
    assert text.count("## Plans: a smaller model under a budget") == 1
    assert "## Which layers can I prune" in text  # the sweep's part is kept
    assert "never evaluated" in text and "plots/plans.png" in text
    assert (planned.folder / "plots" / "plans.png").stat().st_size > 10_000


def test_fine_tuning_runs_are_w_and_b_runs_with_curves_and_the_model(planned) -> None:
    runs = runs_by_name(planned.folder)
    for method in ("knapsack", "threshold", "uniform", "global"):
        (run_dir, info, records), = runs[f"plan/macs0.7-{method}"]
        assert info["job_type"] == "finetune" and info["run_group"] == "planned"
        curves = [h for h in history(records) if "epoch" in h]
        assert [h["epoch"] for h in curves] == [1] and curves[0]["loss"] > 0  # one epoch of fine-tuning
        (model,) = artifacts(records, "model")
        assert manifest_paths(model) == ["pruned.pt"]
        assert info["config"]["update"]["checkpoint_artifact"].startswith("checkpoint-")  # the parent (lineage)


def test_pruned_pt_in_a_fresh_process_and_onnx_give_the_reported_accuracy(planned, cli) -> None:
    row = planned.table[planned.table["method"] == "knapsack"].iloc[0]
    folder = Path(row["folder"])
    # a fresh process: our loader alone, scored on the same images by the command
    run = subprocess.run([sys.executable, "-m", "runner.cli", "score", "--grid", str(planned.path), "--model",
                          str(folder / "pruned.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"accuracy {row['accuracy_finetuned']:.2f}% on 50 images" in run.stdout
    onnx = cli(["--grid", str(planned.path), "--model", str(folder / "pruned.onnx")], cwd=planned.folder,
               command="score")
    assert onnx.returncode == 0 and f"accuracy {row['accuracy_finetuned']:.2f}% on 50 images" in onnx.stdout


def test_a_tampered_plan_is_one_line_and_exit_2(planned, cli, tmp_path) -> None:
    row = planned.table.iloc[0]
    payload = torch.load(Path(row["folder"]) / "pruned.pt", weights_only=True)
    payload["removal"]["layer1.0.conv1"] = list(range(9))  # 8 channels at width 0.125
    torch.save(payload, tmp_path / "pruned.pt")
    run = cli(["--grid", str(planned.path), "--model", str(tmp_path / "pruned.pt")], cwd=tmp_path, command="score")
    assert run.returncode == 2 and run.err_lines == [
        f"error: {tmp_path / 'pruned.pt'}: plan['layer1.0.conv1']: K larger than the unit's channels allow: got 9; "
        "allowed: K from 0 to 7 (layer1.0.conv1 has 8 output channels; at least one must stay); fix: rebuild the "
        "plan with prune-sweep prune (do not edit it by hand)"]


# --- the job's inputs, without Ray -------------------------------------------------------------------------

def test_layer_units_leave_out_what_cannot_be_removed_alone() -> None:
    model = ResNet18(width=0.125).eval()
    swept = {n: SimpleNamespace(out_channels=m.out_channels) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Conv2d) and "shortcut" not in n}
    rankings = {f"{n}/l1_norm": {"order": list(reversed(range(s.out_channels))), "scores": []}
                for n, s in swept.items()}
    units = plan_units(model, swept, "layer", "l1_norm", rankings, 32)
    assert sorted(units.channels) == sorted(n for n in swept if n.endswith("conv1") and n != "conv1")
    assert "conv1" in units.left_out and "layer1.0.conv2" in units.left_out
    assert "plan it as a group" in units.left_out["layer2.0.conv2"]
    assert units.orders["layer1.0.conv1"] == list(reversed(range(8)))


def test_curves_come_from_the_plan_criterion_and_first_repeat() -> None:
    rows = [{"layer": "a", "criterion": "l1_norm", "repeat": 0, "k": k, "accuracy_drop": d, "macs_removed": 10 * k,
             "params_removed": k} for k, d in ((2, 3.0), (1, 1.0))]
    rows += [{"layer": "a", "criterion": "random", "repeat": 1, "k": 1, "accuracy_drop": 50.0, "macs_removed": 10,
              "params_removed": 1}]
    (c,) = unit_curves(rows, {"a": 4}, "l1_norm")
    assert [(p.k, p.drop, p.macs) for p in c.points] == [(0, 0.0, 0), (1, 1.0, 10), (2, 3.0, 20)]
    with pytest.raises(InputError, match="results.csv: no measured point of criterion l1_norm"):
        unit_curves(rows, {"a": 4, "b": 4}, "l1_norm")


def test_the_plan_criterion_is_one_that_ranks_channels() -> None:
    draws = {"random": True, "l1_norm": False, "mean_activation": False, "seed": False}
    assert plan_criterion(None, ["random", "mean_activation", "l1_norm"], draws) == "mean_activation"
    assert plan_criterion("l1_norm", ["random", "mean_activation", "l1_norm"], draws) == "l1_norm"
    with pytest.raises(InputError) as e:
        plan_criterion("random", ["random", "l1_norm"], draws)
    assert str(e.value) == ("plan.criterion: not a swept criterion a plan can use: got 'random'; allowed: l1_norm; "
                            "fix: choose one of those, or add it to sweep.criteria")
    with pytest.raises(InputError, match="plan.criterion: no swept criterion ranks channels"):
        plan_criterion(None, ["random"], draws)


@pytest.mark.parametrize("sets, message", [
    (["sweep.target=input"], "sweep.target: a plan removes output channels for real: got 'input'; allowed: "
                             "output; fix: sweep with target: output (the default) to plan from it"),
    (["plan.criterion=random", "sweep.criteria=[l1_norm, random]"],
     "plan.criterion: not a swept criterion a plan can use: got 'random'"),
    (["plan.budgets=[{macs: 0.5, params: 0.5}]"], "plan.budgets[0]: give exactly one of macs, params"),
    (["plan.score_on=test"], "plan.score_on: the sweep evaluates all 200 test images, so none is left unseen"),
    (["plan.round_to=512"], "plan.round_to: no unit can be pruned with this round_to and min_keep: got 512"),
])
def test_bad_plan_input_is_one_line_and_exit_2(tmp_path, cli, sets, message) -> None:
    path = write_grid(tmp_path / "g.yaml", grid_dict(tmp_path))
    run = cli(["--grid", str(path), "--dry-run", *(x for s in sets for x in ("--set", s))], cwd=tmp_path,
              command="prune")
    assert run.returncode == 2 and len(run.err_lines) == 1 and message in run.err_lines[0], run.stderr


def test_the_dry_runs_refuse_the_folder_as_the_runs_do(tmp_path, cli) -> None:
    """`sweep --resume` with no sweep to resume, `sweep` on a folder that holds results, and `prune` on one that
    holds plans, without --resume: the dry run exits 2 with the run's line and writes nothing; `prune` and
    `validate` on a sweep's folder pass."""
    path = write_grid(tmp_path / "g.yaml", grid_dict(tmp_path, validate={"bn_images": 50}))
    run = cli(["--grid", str(path), "--dry-run", "--resume"], cwd=tmp_path, command="sweep")
    assert run.returncode == 2 and len(run.err_lines) == 1, run.stderr
    assert "--resume: there is no sweep to resume in this folder" in run.err_lines[0]
    assert not (tmp_path / "runs").exists()
    folder = tmp_path / "runs" / "tiny"
    folder.mkdir(parents=True)
    (folder / "results.csv").write_text("layer,criterion,k\nconv1,l1_norm,2\n")  # a sweep's results
    run = cli(["--grid", str(path), "--dry-run"], cwd=tmp_path, command="sweep")
    assert run.returncode == 2 and "this folder already holds results of a sweep" in run.err_lines[0], run.stderr
    for command in ("prune", "validate"):  # they plan from a sweep's results, in its folder
        run = cli(["--grid", str(path), "--dry-run"], cwd=tmp_path, command=command)
        assert run.returncode == 0, (command, run.stderr)
    (folder / "plans.csv").write_text("budget,method\n")
    run = cli(["--grid", str(path), "--dry-run"], cwd=tmp_path, command="prune")
    assert run.returncode == 2 and len(run.err_lines) == 1, run.stderr
    assert "this folder already holds plans of a prune job" in run.err_lines[0] and "--resume" in run.err_lines[0]
    assert sorted(p.name for p in folder.iterdir()) == ["plans.csv", "results.csv"]


def test_score_on_test_needs_unseen_test_images(tmp_path, cli) -> None:
    path = write_grid(tmp_path / "g.yaml", grid_dict(tmp_path, plan={"score_on": "test"}))
    run = cli(["--grid", str(path), "--model", str(tmp_path / "x.pt")], cwd=tmp_path, command="score")
    assert run.returncode == 2 and run.err_lines == [
        "error: plan.score_on: the sweep evaluates all 200 test images, so none is left unseen: got 'test'; "
        "allowed: eval, or test with data.eval_size below the test split; fix: set data.eval_size (e.g. 100) "
        "before sweeping, or plan.score_on: eval"]


def test_score_says_whether_the_unseen_test_images_are_unseen_by_the_models_plan(tmp_path) -> None:
    """plan.score_on: test scores the grid's test images after its eval images; they are unseen by the model's
    plan only if its plan.json says it was chosen on the grid's eval images."""
    from runner.inputs.data import load_data
    from runner.job.prune import _score_words
    from runner.job.setting import chosen_on, scoring_images

    grid = parse_grid(grid_dict(tmp_path, data={"eval_size": 120}, plan={"score_on": "test"}), "g.yaml")
    data = load_data(grid.data, 10, grid.seed, training=False, scored=True)
    scored, words = scoring_images(grid, data)
    assert len(scored) == 80 and words.startswith("80 test images the sweep never evaluated (")
    model = tmp_path / "pruned.pt"
    assert _score_words(grid, data, model, words) == \
        f"{words}; no plan.json beside the model says which images chose its plan"
    (tmp_path / "plan.json").write_text(json.dumps({"chosen_on": chosen_on(data)}))
    assert _score_words(grid, data, model, words) == words
    (tmp_path / "plan.json").write_text(json.dumps({"chosen_on": "the sweep's 60 eval images (...)"}))
    assert _score_words(grid, data, model, words) == (
        f"{words}; but its plan was chosen on the sweep's 60 eval images (...), not on the grid's eval images, so "
        "these may include images that chose it")


def test_score_checks_the_models_lineage_against_the_grid(sweep_checkpoint, tmp_path, cli) -> None:
    """A pruned.pt planned from checkpoint A, scored with a grid whose checkpoint is another trained file: one
    line, exit 2. With A's grid it is scored, and the words say what is known of the images."""
    from model.zoo import Spec
    from runner.inputs import checkpoints
    from runner.planning.export import save_pruned, spec_meta
    from runner.planning.removal import pruned_copy

    base = checkpoints.load(sweep_checkpoint, "resnet18", 0.125, 10)
    other = tmp_path / "other.pt"
    other_sha = checkpoints.save(other, base.model, {**base.meta, "seed": 1})  # the same network, another file
    removal = {"layer1.0.conv1": [0, 3]}
    meta = {**spec_meta(Spec("resnet18", 0.125, 10), 32), "mean": base.meta["mean"], "std": base.meta["std"],
            "plan": "macs0.7-knapsack", "base_checkpoint": str(sweep_checkpoint),
            "base_checkpoint_sha256": base.sha256, "classes": list(base.meta["classes"])}
    save_pruned(tmp_path / "pruned.pt", pruned_copy(base.model, removal, 32), removal, meta)
    grid_b = write_grid(tmp_path / "b.yaml", grid_dict(tmp_path, {"checkpoint": {"path": str(other)}}))
    run = cli(["--grid", str(grid_b), "--model", str(tmp_path / "pruned.pt")], cwd=tmp_path, command="score")
    assert run.returncode == 2 and run.err_lines == [
        f"error: --model: planned from the checkpoint with sha256 {base.sha256[:12]} ({sweep_checkpoint}), not from "
        f"the grid's checkpoint.path {other} ({other_sha[:12]}): got '{tmp_path / 'pruned.pt'}'; allowed: a pruned "
        "model planned from the grid's checkpoint; fix: score it with the grid that planned it (config.yaml in that "
        "sweep's output folder)"], run.stderr
    grid_a = write_grid(tmp_path / "a.yaml", grid_dict(tmp_path, {"checkpoint": {"path": str(sweep_checkpoint)}}))
    run = cli(["--grid", str(grid_a), "--model", str(tmp_path / "pruned.pt")], cwd=tmp_path, command="score")
    assert run.returncode == 0, run.stderr
    assert run.out_lines[0].endswith(" right): synthetic test images 1-200 (the grid's 200 eval images; no plan.json "
                                     "beside the model says which images chose its plan)")
    meta["classes"] = ["cat", "dog"]
    save_pruned(tmp_path / "pruned.pt", pruned_copy(base.model, removal, 32), removal, meta)
    run = cli(["--grid", str(grid_a), "--model", str(tmp_path / "pruned.pt")], cwd=tmp_path, command="score")
    assert run.returncode == 2 and len(run.err_lines) == 1
    assert run.err_lines[0].startswith("error: --model: its classes (cat, dog) differ from the grid's data (")


def test_prune_dry_run_describes_the_plans(tmp_path, cli) -> None:
    path = write_grid(tmp_path / "g.yaml", grid_dict(tmp_path, sweep={"unit": "group", "criteria": ["l1_norm"]}))
    run = cli(["--grid", str(path), "--dry-run"], cwd=tmp_path, command="prune")
    assert run.returncode == 0, run.stderr
    assert "plans: budgets macs0.5 x methods knapsack, threshold, uniform, global (4 plans), criterion l1_norm, " \
        "unit group" in run.stdout
    assert "round_to 1, min_keep 0.1, correction accept (at most 8 moves), fine-tuning 2 epochs (" in run.stdout
    run = cli(["--grid", str(path), "--dry-run", "--set", "plan.finetune.epochs=1", "--set", "plan.correction=search"],
              cwd=tmp_path, command="prune")
    assert run.returncode == 0 and "correction search (at most 8 moves), fine-tuning 1 epoch (" in run.stdout, \
        run.stderr


def test_plan_defaults() -> None:
    plan = parse_grid({}, "g").plan
    assert plan.finetune.schedule == "cosine" and plan.finetune.epochs == 2 and plan.criterion is None
    assert [b.label for b in plan.budgets] == ["macs0.5"] and plan.score_on == "eval"


@pytest.mark.slow
def test_mobilenet_v2_goes_through_sweep_plan_removal_and_fine_tuning(ray_session, tmp_path) -> None:
    """torchvision's mobilenet_v2 (width 0.25, synthetic images): trained, swept by groups, planned by the four
    methods, removed, fine-tuned and verified, in one prune job."""
    import runner.job.plan as plan
    from runner.job.prune import run_prune
    from runner.job.sweep import Options

    grid = grid_dict(tmp_path, name="mobile", data={"eval_size": 100},
                     sweep={"layers": "all", "unit": "group", "k": {"fractions": [0.25, 0.5]}, "criteria": ["l1_norm"],
                            "batch_size": 100},
                     plan={"budgets": [{"macs": 0.8}], "max_corrections": 1, "score_on": "test",
                           "finetune": {"epochs": 1, "batch_size": 100}}, wandb={"mode": "disabled"})
    grid["model"] = {"arch": "torchvision:mobilenet_v2", "num_classes": 10, "kwargs": {"width_mult": 0.25}}
    path = write_grid(tmp_path / "mobile.yaml", grid)
    quick = functools.partial(latency_module.latency, warmup=1, min_runs=3, min_seconds=0.0)
    original, plan.latency = plan.latency, quick
    try:
        outcome = run_prune(Options(str(path)))
    finally:
        plan.latency = original
    t = pd.read_csv(outcome.folder / "plans.csv")
    assert outcome.failed == [] and sorted(t["method"]) == ["global", "knapsack", "threshold", "uniform"]
    assert (t["macs_kept"] <= 0.8).all() and (t["units_pruned"] > 0).all()
    assert (t["masked_vs_removed_differ"] == 0).all() and (t["onnx_differ"] == 0).all()
    assert (t["accuracy_final"] == t["accuracy_finetuned"]).all()


# --- a job stopped at a chosen stage, then resumed --------------------------------------------------------

EPOCH_LINE = ": epoch 1 of 1,"
TIMING = ("latency_ms_b1", "latency_ms_b64", "base_latency_ms_b1", "base_latency_ms_b64", "folder")
SWEEP_FILES = ("results.csv", "rankings.json", "config.yaml", "report.md")


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    """plans.csv without what differs between two runs of the same job: timings, latency, the folder."""
    return table.drop(columns=[c for c in table.columns if c in TIMING or "latency" in c])


def fingerprints(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Each plan.json: (inode, mtime in ns, sha256): a file written again changes at least one of them."""
    import hashlib

    return {p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.glob("plans/*/plan.json"))}


def stopped_after_first_plan(planned, tmp_path: Path, monkeypatch, grid: dict) -> tuple[Path, Path, dict]:
    """The `planned` sweep's files copied to a new folder, `grid` (the planned job's, changed) written there, and
    the job run until an injected failure right after its first plan, then refused without --resume; returns the
    folder, the grid's path and the fingerprints of the plan.json files written."""
    import runner.job.plan as plan
    import runner.job.prune as prune
    from runner.api import prune as prune_api

    folder = tmp_path / "planned"
    folder.mkdir()
    for name in SWEEP_FILES:
        (folder / name).write_bytes((planned.folder / name).read_bytes())
    path = write_grid(tmp_path / "planned.yaml", {**grid, "output": str(tmp_path)})
    monkeypatch.setattr(plan, "latency", functools.partial(latency_module.latency, warmup=1, min_runs=3,
                                                           min_seconds=0.0))
    made, real = [], prune.make_plan

    def first_only(*args, **kwargs):
        if made:
            raise RuntimeError("injected: stopped after the first plan")
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(prune, "make_plan", first_only)
    with pytest.raises(RuntimeError, match="injected"):
        prune_api(path)
    first = fingerprints(folder)
    assert list(first) == ["macs0.7-knapsack"] and len(pd.read_csv(folder / "plans.csv")) == 1
    assert not list(folder.glob("plans/*/correct_finetuned.npy"))
    monkeypatch.setattr(prune, "make_plan", real)
    with pytest.raises(InputError, match=r"already holds plans of a prune job.*--resume"):
        prune_api(path)
    return folder, path, first


def test_a_job_stopped_after_its_first_plan_resumes_to_the_same_plans(planned, tmp_path, monkeypatch,
                                                                      caplog) -> None:
    """The smaller kill-and-resume test (the slow group has the one that SIGKILLs): the `planned` job's knapsack
    and uniform plans again in a copy of its sweep's folder, stopped by an injected failure after its first
    plan, refused without --resume, resumed to the end: the same rows as the uninterrupted job, the first
    plan.json never written again, and only the second plan made by the resumed run."""
    from runner.api import prune as prune_api

    grid = {**planned.grid, "plan": {**planned.grid["plan"], "methods": ["knapsack", "uniform"]}}
    folder, path, first = stopped_after_first_plan(planned, tmp_path, monkeypatch, grid)
    caplog.set_level("INFO", logger="runner")
    table = prune_api(path, resume=True)
    assert table.attrs["failed"] == []
    now = fingerprints(folder)
    assert sorted(now) == ["macs0.7-knapsack", "macs0.7-uniform"] and now["macs0.7-knapsack"] == first["macs0.7-knapsack"]
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert said.count("made by an earlier run") == 1 and "macs0.7-knapsack: made by an earlier run" in said
    whole = planned.table[planned.table["method"].isin(["knapsack", "uniform"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(comparable(table), comparable(whole), check_exact=True)


@pytest.mark.slow
def test_a_job_stopped_while_planning_and_killed_while_fine_tuning_resumes_to_the_same_plans(
        planned, tmp_path, monkeypatch, caplog) -> None:
    """The `planned` job again in a copy of its sweep's folder: stopped by an injected failure after its first
    plan, refused without --resume, resumed and stopped before fine-tuning, resumed as a command whose process
    group is SIGKILLed once the first fine-tuning epoch is logged, resumed to the end: the same plans.csv as the
    uninterrupted job, no plan.json written again, no epoch fine-tuned twice (each finished epoch logs one
    line)."""
    import runner.job.prune as prune
    from runner.api import prune as prune_api

    folder, path, first = stopped_after_first_plan(planned, tmp_path, monkeypatch, planned.grid)

    def stop(*args, **kwargs):
        raise RuntimeError("injected: stopped before fine-tuning")

    finetune = prune._finetune
    monkeypatch.setattr(prune, "_finetune", stop)  # the other plans made here, where timing is quick
    with pytest.raises(RuntimeError, match="injected"):
        prune_api(path, resume=True)
    monkeypatch.setattr(prune, "_finetune", finetune)
    assert len(fingerprints(folder)) == 4 and fingerprints(folder)["macs0.7-knapsack"] == first["macs0.7-knapsack"]

    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "prune", "--grid", str(path), "--resume"],
                                cwd=tmp_path, env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 600
        while EPOCH_LINE not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = log.read_text()
    assert EPOCH_LINE in killed, killed[-3000:]
    second = fingerprints(folder)
    assert len(second) == 4 and {k: second[k] for k in first} == first
    assert not list(folder.glob("plans/*/verified.json"))

    caplog.set_level("INFO", logger="runner")
    table = prune_api(path, resume=True)
    assert table.attrs["failed"] == []
    assert fingerprints(folder) == second  # no plan.json written again
    pd.testing.assert_frame_equal(comparable(table), comparable(planned.table), check_exact=True)
    resumed = "\n".join(r.getMessage() for r in caplog.records)
    assert resumed.count("made by an earlier run") == 4
    epochs = re.findall(r"fine-tuning (\S+): epoch (\d+) of", killed + "\n" + resumed)
    assert len(epochs) == len(set(epochs)), epochs
    assert "## Plans: a smaller model under a budget" in (folder / "report.md").read_text()


def test_a_changed_plan_section_is_refused_before_anything_runs_and_by_the_dry_run(sweep_checkpoint, tmp_path,
                                                                                  cli) -> None:
    """The prune job's record (plans/job.json) against the grid on --resume, before the sweep is measured or the
    data loaded: `check_inputs` and the dry run refuse a changed key in one line; an added budget passes."""
    from runner.inputs.trials import plan_trials
    from runner.job.prune import check_inputs, job_identity
    from model.checkpoint import sha256
    from runner.outputs.plans import write_job

    base = grid_dict(tmp_path, e2e(sweep_checkpoint), plan={"budgets": [{"macs": 0.6}], "methods": ["uniform"]})
    grid = parse_grid(base, "g.yaml")
    write_job(grid.folder, {"job_id": "0", "identity": job_identity(grid, sha256(sweep_checkpoint))})
    added = parse_grid({**base, "plan": {**base["plan"], "budgets": [{"macs": 0.6}, {"macs": 0.8}]}}, "g.yaml")
    check_inputs(added, plan_trials(added), resume=True)
    changed = {**base, "plan": {**base["plan"], "min_keep": 0.3}}
    with pytest.raises(InputError, match=r"the grid changed since this prune job started \(plan.min_keep: 0.1 then"):
        check_inputs(parse_grid(changed, "g.yaml"), plan_trials(parse_grid(changed, "g.yaml")), resume=True)
    path = write_grid(tmp_path / "g.yaml", changed)
    run = cli(["--grid", str(path), "--dry-run", "--resume"], cwd=tmp_path, command="prune")
    assert run.returncode == 2 and len(run.err_lines) == 1 and "plan.min_keep: 0.1 then, 0.3 now" in run.err_lines[0]
    assert not (grid.folder / "results.csv").exists()


def test_a_resume_that_changes_the_plan_section_names_the_key_and_both_values(tmp_path) -> None:
    from runner.job.prune import _check_resume, job_identity

    base = grid_dict(tmp_path, plan={"budgets": [{"macs": 0.6}], "methods": ["knapsack", "uniform"]})
    before = job_identity(parse_grid(base, "g"), "abc")

    def now(**plan) -> dict:
        return job_identity(parse_grid({**base, "plan": {**base["plan"], **plan}}, "g"), "abc")

    _check_resume(parse_grid(base, "g"), before, now(budgets=[{"macs": 0.6}, {"macs": 0.8}]))  # adds a budget
    _check_resume(parse_grid(base, "g"), before, now(methods=["knapsack", "uniform", "threshold"]))  # a method
    for change, words in (({"max_corrections": 2}, "plan.max_corrections: 8 then, 2 now"),
                          ({"budgets": [{"macs": 0.8}]}, "plan.budgets: ['macs0.6'] then, ['macs0.8'] now"),
                          ({"methods": ["uniform"]}, "plan.methods: ['knapsack', 'uniform'] then, ['uniform'] now"),
                          ({"finetune": {"epochs": 3}}, "plan.finetune.epochs: 2 then, 3 now"),
                          ({"correction": "search"}, "plan.correction: 'accept' then, 'search' now")):
        with pytest.raises(InputError) as e:
            _check_resume(parse_grid(base, "g"), before, now(**change))
        assert words in str(e.value) and "--resume" in str(e.value) and "\n" not in str(e.value)
    older = {**before, "plan": {k: v for k, v in before["plan"].items() if k != "correction"}}
    _check_resume(parse_grid(base, "g"), older, now())  # a job recorded before plan.correction: it accepted
    with pytest.raises(InputError, match="plan.correction: 'accept' then, 'search' now"):
        _check_resume(parse_grid(base, "g"), older, now(correction="search"))
