"""The command line, its entry point called in this process: --dry-run computes nothing, bad
input (grid file, checkpoint, data, flags) is exit 2 with one exact line, and an output folder is never
overwritten (nor resumed when there is nothing to resume). That `python scripts/sweep.py` reaches this entry point
and exits with its code is proved once, in a subprocess, by tests/test_sweep.py.

The grid fixtures are tests/grids/e2e_*.yaml; their relative paths resolve against the directory the command
runs in, each test's own tmp folder.
"""

from __future__ import annotations

import pytest
from e2e_helpers import GRIDS, e2e, grid_dict, refused, write_grid

from runner.errors import InputError

LAYER_NAMES = ("conv1, layer1.0.conv1, layer1.0.conv2, layer1.1.conv1, layer1.1.conv2, layer2.0.conv1, "
               "layer2.0.conv2, layer2.0.shortcut.conv, layer2.1.conv1, layer2.1.conv2, layer3.0.conv1, "
               "layer3.0.conv2, layer3.0.shortcut.conv, layer3.1.conv1, layer3.1.conv2, layer4.0.conv1, "
               "layer4.0.conv2, layer4.0.shortcut.conv, layer4.1.conv1, layer4.1.conv2")

# case: (grid fixture, extra arguments, the one line on stderr); {grid} is the grid file, {tmp} the folder the
# command runs in.
BAD = {
    "unknown_key": (
        "e2e_bad_unknown_key.yaml", [],
        "error: {grid}: sweep.layer: unknown key: got 'layer'; allowed: layers, include_shortcuts, unit, k, "
        "criteria, target, calibration, random_repeats, random_seed, batch_size, retries, feature_map_points, "
        "bn_recalibration, stop_drop; "
        "fix: remove it or correct its spelling"),
    "wrong_type": (
        "e2e_bad_wrong_type.yaml", [],
        "error: {grid}: sweep.criteria: wrong type: got 7; allowed: a valid list; fix: change sweep.criteria in "
        "the grid file (or --set sweep.criteria=...)"),
    "unknown_layer": (
        "e2e_bad_unknown_layer.yaml", [],
        "error: {grid}: sweep.layers[1]: no such layer: got 'layer5.0.conv1'; allowed: " + LAYER_NAMES +
        "; fix: use one of those names or a glob pattern such as \"layer*.conv2\""),
    "unknown_criterion": (
        "e2e_bad_unknown_criterion.yaml", [],
        "error: {grid}: sweep.criteria[1]: unknown criterion: got 'l2_norm'; allowed: mean_activation, "
        "mean_abs_activation, l1_norm, bn_scale, taylor, random, seed; fix: use one of those names"),
    "k_above_channels": (
        "e2e_bad_k_above_channels.yaml", [],
        "error: {grid}: sweep.k: K = 9 is above the 8 output channels of conv1: got [1, 9]; allowed: K from 1 to "
        "8 for that layer; fix: use k: {{fractions: [...]}} to scale K per layer, or leave that layer out"),
    "layers_empty": (
        "e2e_bad_layers_empty.yaml", [],
        "error: {grid}: sweep.layers: empty: got []; allowed: all, or a list of layer names or glob patterns; "
        "fix: write layers: all, or name at least one layer"),
    "k_empty": (
        "e2e_bad_k_empty.yaml", [],
        "error: {grid}: sweep.k: empty: got []; allowed: integers >= 1 (K = 0 is the baseline, always "
        "measured); fix: give at least one value"),
    "checkpoint_missing": (
        "e2e_bad_checkpoint_missing.yaml", [],
        "error: checkpoint.path: no such file, and the grid has no checkpoint.train section to train it: got "
        "'{tmp}/missing.pt'; allowed: an existing checkpoint, or a recipe; fix: add checkpoint.train "
        "({{recipe: standard, epochs: 30}}) or fix the path"),
    "npz_missing": (
        "e2e_bad_npz_missing.yaml", [],
        "error: data.train: no such file: got '{tmp}/missing_train.npz'; allowed: an existing .npz file; fix: "
        "check the path"),
    "npz_not_npz": (
        "e2e_bad_npz_not_npz.yaml", [],
        "error: data.train: not a readable .npz file (not a whole zip archive): got '{tmp}/not_npz.npz'; "
        "allowed: a file written by numpy.savez; fix: save the arrays with numpy.savez(path, images=..., "
        "labels=...)"),
    "checkpoint_missing_dry_run": (
        "e2e_bad_checkpoint_missing.yaml", ["--dry-run"],
        "error: checkpoint.path: no such file, and the grid has no checkpoint.train section to train it: got "
        "'{tmp}/missing.pt'; allowed: an existing checkpoint, or a recipe; fix: add checkpoint.train "
        "({{recipe: standard, epochs: 30}}) or fix the path"),
    "npz_not_npz_dry_run": (
        "e2e_bad_npz_not_npz.yaml", ["--dry-run"],
        "error: data.train: not a readable .npz file (not a whole zip archive): got '{tmp}/not_npz.npz'; "
        "allowed: a file written by numpy.savez; fix: save the arrays with numpy.savez(path, images=..., "
        "labels=...)"),
    "unknown_flag": (
        "e2e_dry_run.yaml", ["--bogus"],
        "error: unrecognized arguments: --bogus; allowed: see prune-sweep sweep --help; fix: correct the command line"),
    # the run's own input checks, made by the dry run too, and both refuse before anything is made
    "eval_size_dry_run": (
        "e2e_dry_run.yaml", ["--dry-run", "--set", "data.eval_size=500"],
        "error: --set data.eval_size=500: data.eval_size: larger than the test split: got 500; allowed: 1 .. 200, "
        "or null for all; fix: set data.eval_size: 200 or null"),
    "eval_size": (
        "e2e_dry_run.yaml", ["--set", "data.eval_size=500"],
        "error: --set data.eval_size=500: data.eval_size: larger than the test split: got 500; allowed: 1 .. 200, "
        "or null for all; fix: set data.eval_size: 200 or null"),
    "calibration_size_dry_run": (
        "e2e_dry_run.yaml", ["--dry-run", "--set", "data.calibration_size=600"],
        "error: --set data.calibration_size=600: data.calibration_size: not smaller than the train split: got 600; "
        "allowed: 1 .. 599; fix: hold out fewer images"),
    # a value given by --set is blamed on the flag; a glob that matches nothing says so
    "layer_by_set": (
        "e2e_dry_run.yaml", ["--dry-run", "--set", "sweep.layers=[layer9.conv1]"],
        "error: --set sweep.layers=[layer9.conv1]: sweep.layers[0]: no such layer: got 'layer9.conv1'; allowed: "
        + LAYER_NAMES + "; fix: use one of those names or a glob pattern such as \"layer*.conv2\""),
    "glob_matches_nothing": (
        "e2e_dry_run.yaml", ["--dry-run", "--set", "sweep.layers=[layer9*]"],
        "error: --set sweep.layers=[layer9*]: sweep.layers[0]: the pattern matches no layer: got 'layer9*'; "
        "allowed: " + LAYER_NAMES + "; fix: correct the pattern so that it matches some of those names"),
    "width_of_a_torchvision_arch": (
        "e2e_dry_run.yaml", ["--dry-run", "--set", "model.arch=torchvision:resnet18"],
        "error: {grid}: model.width: scales arch resnet18 only, not torchvision:resnet18: got 0.125; allowed: 1 "
        "(the default) with this arch; fix: remove model.width, and give the builder's own width argument in "
        "model.kwargs (e.g. kwargs: {{width_mult: 0.5}} for torchvision:mobilenet_v2)"),
    "resume_without_sweep": (
        "e2e_dry_run.yaml", ["--resume"],
        "error: --resume: there is no sweep to resume in this folder: got '{tmp}/runs/e2e-dry'; allowed: a "
        "folder where a sweep with this name started; fix: run without --resume"),
}

@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_exact_line_exit_2_and_leaves_nothing_behind(cli, tmp_path_factory, case):
    """Bad input gives ONE line, exit code 2, and it is caught before any work starts: no output
    folder, no checkpoint."""
    tmp = tmp_path_factory.mktemp(case)
    (tmp / "not_npz.npz").write_text("these are not arrays\n", encoding="utf-8")
    grid_file, extra, expected = BAD[case]
    grid = GRIDS / grid_file
    result = cli(["--grid", str(grid), *extra], cwd=tmp)
    assert refused(result) == expected.format(grid=grid, tmp=tmp)
    made = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.name != "not_npz.npz")
    assert made == []


def test_wrong_flag_value_is_one_line(cli, tmp_path):
    result = cli(["--grid", str(GRIDS / "e2e_dry_run.yaml"), "--wandb-mode", "sometimes"], cwd=tmp_path)
    assert refused(result).startswith("error: argument --wandb-mode: invalid choice: 'sometimes'")


# ---- --dry-run ----

# l1_norm: 8 layers x 3 K; random: 8 layers x 3 K x 3 orders (sweep.random_repeats, default 3)
@pytest.mark.parametrize("extra, trials, points, drawn", [
    ([], 16, 96, 3), (["--set", "sweep.criteria=[l1_norm]"], 8, 24, 0), (["--set", "sweep.random_repeats=5"], 16, 144, 5)])
def test_dry_run_computes_nothing(cli, tmp_path, monkeypatch, extra, trials, points, drawn):
    import ray

    from runner.job import cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("a dry run started Ray")

    monkeypatch.setattr(cluster, "start_ray", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    result = cli(["--grid", str(GRIDS / "e2e_dry_run.yaml"), "--dry-run", *extra], cwd=tmp_path)
    assert result.returncode == 0, result.explain()
    lines = result.out_lines
    assert lines[-1] == f"trials: {trials} points: {points}", result.explain()
    if drawn:
        assert lines[-2] == f"random orders drawn per layer: {drawn} (each measured at every K)", result.explain()
    # layers "layer*.conv2" at width 0.125, K = fractions 0.25, 0.5, 1.0 of each layer's channels
    shown = {line.split()[0]: line.split(None, 1)[1] for line in lines if line.startswith("  layer")}
    channels = {"layer1.0.conv2": 8, "layer1.1.conv2": 8, "layer2.0.conv2": 16, "layer2.1.conv2": 16,
                "layer3.0.conv2": 32, "layer3.1.conv2": 32, "layer4.0.conv2": 64, "layer4.1.conv2": 64}
    assert shown.keys() == channels.keys(), result.explain()
    for layer, c in channels.items():
        assert shown[layer].split() == [str(c), "->", str(c), "K:", f"{c // 4},", f"{c // 2},", str(c)], shown[layer]
    checkpoint = tmp_path / "checkpoints" / "e2e-dry.pt"
    assert any(str(checkpoint) in line and "missing" in line for line in lines), result.explain()
    # nothing computed: no output folder, no checkpoint trained, no Ray started
    assert not checkpoint.exists() and not checkpoint.parent.exists()
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert "Ray" not in result.stderr, result.explain()


def test_dry_run_checks_an_image_folders_classes_against_the_model(cli, tmp_path):
    """An image folder of 10 classes and model.num_classes 5: refused by the dry run (as by the run) from the
    folder names alone, nothing decoded; with 10, the dry run reports the folder's sizes."""
    from PIL import Image

    for part, count in (("train", 3), ("test", 2)):
        for c in range(10):
            folder = tmp_path / "images" / part / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (c * 20, i, 0)).save(folder / f"{i}.png")
    grid = write_grid(tmp_path / "g.yaml", grid_dict(tmp_path, data={
        "dataset": "imagefolder", "root": str(tmp_path / "images"), "calibration_size": 10}))
    result = cli(["--grid", str(grid), "--dry-run", "--set", "model.num_classes=5"], cwd=tmp_path)
    assert refused(result) == ("error: --set model.num_classes=5: model.num_classes: the data has 10 classes: got 5; "
                               "allowed: 10; fix: set model.num_classes: 10")
    result = cli(["--grid", str(grid), "--dry-run"], cwd=tmp_path)
    assert result.returncode == 0, result.explain()
    assert result.out_lines[0] == (f"sweep tiny: resnet18 width 0.125, data imagefolder, 30 train and 20 test images, "
                                   f"10 classes, subsets in data.order stratified, output "
                                   f"{tmp_path / 'runs' / 'tiny'}")
    assert not list(tmp_path.rglob("*.npz"))  # nothing decoded


def test_dry_run_warns_of_a_checkpoint_near_chance(cli, tmp_path):
    """The checkpoint's own test accuracy, 11% on 10 classes: within 5 points of chance (10%)."""
    from model.resnet import ResNet18
    from runner.inputs import checkpoints, synthetic

    checkpoints.save(tmp_path / "weak.pt", ResNet18(width=0.125), {
        "arch": "resnet18", "width": 0.125, "num_classes": 10, "dataset": "synthetic",
        "classes": list(synthetic.CLASSES), "mean": [0.5] * 3, "std": [0.25] * 3, "test_accuracy": 11.0})
    grid = write_grid(tmp_path / "g.yaml", grid_dict(tmp_path, {"checkpoint": {"path": str(tmp_path / "weak.pt")}}))
    result = cli(["--grid", str(grid), "--dry-run"], cwd=tmp_path)
    assert result.returncode == 0, result.explain()
    assert result.out_lines[2] == (
        "warning: the base accuracy 11.00% is within 5 points of chance (10.00% for 10 classes): the network has "
        "learnt little, so its curves say little about a trained one; train the checkpoint further "
        "(checkpoint.train.epochs) or point checkpoint.path at a trained one")


def test_version(cli, capsys):
    from importlib.metadata import version

    from runner.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"prune-sweep {version('prune-sweep')}\n"


def test_a_refused_run_removes_the_folder_it_made_and_nothing_else(tmp_path):
    from runner.job.folder import folder_lock

    made, kept = tmp_path / "runs" / "new", tmp_path / "runs" / "old"
    kept.mkdir(parents=True)
    for folder in (made, kept):
        with pytest.raises(InputError), folder_lock(folder):
            raise InputError("data.eval_size", 5000, "larger than the test split", "1 .. 2000", "set it")
    assert not made.exists() and sorted(p.name for p in kept.iterdir()) == [".lock"]


# ---- the output folder (--resume where there is no sweep: case resume_without_sweep above) ----

def test_fresh_sweep_refuses_a_folder_with_results(cli, small_sweep, tmp_path):
    folder = small_sweep.folder
    before = (folder / "results.csv").read_bytes()
    result = cli(["--grid", str(small_sweep.grid_path)], cwd=tmp_path)
    assert refused(result) == (
        f"error: output: this folder already holds results of a sweep: got '{folder}'; allowed: a new folder, or "
        "--resume to continue that sweep; fix: add --resume, or choose another name or --output")
    assert (folder / "results.csv").read_bytes() == before



# ---- the calibration hold-out the checkpoint was trained without ----

def test_a_checkpoint_trained_without_other_images_is_refused(cli, sweep_checkpoint, tmp_path):
    """The session's checkpoint was trained holding out 100 of 600 synthetic train images (seed 0); a grid that
    holds out 120 would rank channels on images the checkpoint was trained on."""
    from runner.inputs.data import Holdout

    grid = write_grid(tmp_path / "held.yaml", grid_dict(tmp_path, e2e(sweep_checkpoint), name="held",
                                                        sweep={"layers": ["conv1"], "k": [1], "criteria": ["l1_norm"]}))
    then, now = Holdout.of(600, 100, 0), Holdout.of(600, 120, 0)
    expected = (
        "error: checkpoint.path: trained without the calibration hold-out seed 0, 100 of 600 train images "
        f"(indices sha256 {then.sha256[:12]}), but this sweep holds out seed 0, 120 of 600 train images (indices "
        f"sha256 {now.sha256[:12]}), so its calibration images may have been trained on: got '{sweep_checkpoint}'; "
        "allowed: a checkpoint trained with the sweep's hold-out (same seed, data.calibration_size and train "
        "images); fix: set seed: 0 and data.calibration_size: 100 as when it was trained, or retrain it, or set "
        "checkpoint.foreign: true (or sweep.calibration: test) to rank on these images anyway")
    result = cli(["--grid", str(grid), "--set", "data.calibration_size=120"], cwd=tmp_path)
    assert result.returncode == 2, result.explain()
    assert result.err_lines == [expected], result.explain()
    assert not (tmp_path / "runs").exists()  # refused before anything was made
    # the same check in --dry-run; and what lets such a checkpoint through (in process: no command needed)
    from runner.job.sweep import Options, dry_run

    with pytest.raises(InputError) as err:
        dry_run(Options(str(grid), overrides=("data.calibration_size=120",)))
    assert f"error: {err.value}" == expected
    for allowed in ("checkpoint.foreign=true", "sweep.calibration=test"):
        assert dry_run(Options(str(grid), overrides=("data.calibration_size=120", allowed)))[-1] == \
            "trials: 1 points: 1"


# ---- the process's exit (runner.cli.leave) ----

LEAVE = """
import atexit, sys, threading, time
from runner.cli import leave
atexit.register(lambda: print("exit handler ran", flush=True))
print("unflushed line", end="")
sys.stderr.write("to stderr")
if sys.argv[1] == "thread":  # a thread still working: the usual exit waits for it
    threading.Thread(target=lambda: (time.sleep(0.3), print(" thread done", end=""))).start()
leave(int(sys.argv[2]))
"""


@pytest.mark.parametrize("mode, code", [("alone", 0), ("alone", 3), ("thread", 2)])
def test_leave_runs_the_exit_handlers_flushes_and_exits_with_the_code(tmp_path, mode, code):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LEAVE, mode, str(code)], capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    expected = "unflushed line" + (" thread done" if mode == "thread" else "") + "exit handler ran\n"
    assert done.stdout == expected
    assert done.stderr == "to stderr"


def test_a_command_starts_its_own_wandb_service(monkeypatch):
    # W&B hands its service's address to child processes: a job started by a W&B-using parent (this test
    # session) would log into the parent's service, where a killed job's runs stay open and a --resume finds
    # their ids in use
    import os

    from runner.cli import run_main

    monkeypatch.setenv("WANDB_SERVICE", "2-4321-tcp-localhost-45678")
    seen = []
    assert run_main(lambda: seen.append(os.environ.get("WANDB_SERVICE"))) == 0
    assert seen == [None]
