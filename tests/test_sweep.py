"""End-to-end sweeps: the outputs of a real sweep, its W&B runs read back with W&B's own
CLI, interruption and --resume, a crashed trial retried, and W&B pointed at a server that is not there.

Every sweep is tiny (width 0.125, a few hundred synthetic images, one shared checkpoint trained once per
session). In-process sweeps share the session's Ray (`ray_session`); what needs a process of its own (Ctrl-C,
environment reaching Ray workers) runs `python scripts/sweep.py` in a subprocess, and one of those also proves
that the script reaches the command and exits with its code.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from e2e_helpers import (SMALL_CRITERIA, SMALL_EVAL, SMALL_FRACTIONS, SMALL_LAYERS, artifacts, e2e, expected_points, finish, grid_dict, history, keys, leet_records, leet_summary, manifest_paths, measured,
    paired_interval_by_hand, results, run_cli, run_info, runs_by_name, start_cli, stop_group, values,
    wandb_run_dirs, write_grid)

from model.checkpoint import sha256
from runner.config import load_grid
from runner.inputs.data import class_counts, load_data
from runner.outputs.report import fraction_label, trial_summary


def small_ks(channels: int) -> list[int]:
    """K for the small sweep's fractions, written out: 8 -> 2, 4; 16 -> 4, 8; 32 -> 8, 16."""
    return {8: [2, 4], 16: [4, 8], 32: [8, 16]}[channels]


SMALL_POINTS = expected_points(SMALL_LAYERS, SMALL_CRITERIA, small_ks)


# ---- 1. outputs on disk ----

def test_every_point_once_with_checkpoint_and_baseline(small_sweep):
    outcome, rows = small_sweep.outcome, results(small_sweep.folder)
    assert (outcome.points, outcome.expected, outcome.measured, outcome.failed) == (12, 12, 12, [])
    assert sorted(keys(rows)) == sorted(SMALL_POINTS)  # every point, each exactly once
    sha = sha256(small_sweep.checkpoint)
    baseline = rows[0]["baseline_accuracy"]
    assert 0 < baseline <= 100
    for r in rows:
        where = f"{r['layer']}/{r['criterion']} K={r['k']}"
        assert r["checkpoint_sha256"] == sha, where
        assert r["baseline_accuracy"] == baseline, where
        assert r["accuracy_drop"] == pytest.approx(baseline - r["accuracy"], abs=2e-6), where
        assert r["channels"] == SMALL_LAYERS[r["layer"]], where
        assert r["fraction"] == pytest.approx(r["k"] / r["channels"], abs=1e-6), where
        assert r["target"] == "output" and r["eval_images"] == SMALL_EVAL, where
        correct = r["accuracy"] * SMALL_EVAL / 100  # accuracy is percent of the evaluated images
        assert correct == pytest.approx(round(correct), abs=1e-3), where
        assert math.isfinite(r["loss"]) and r["loss"] > 0, where
        assert r["params_removed"] > 0 and r["macs_removed"] > 0, where
        # the trial's own baseline, device and precision; the paired interval from the images that flipped
        assert (r["device"], r["dtype"], r["repeat"]) == ("cpu", "float32", 0), where
        assert r["accuracy_drop"] == pytest.approx(100 * (r["right_to_wrong"] - r["wrong_to_right"]) / SMALL_EVAL,
                                                   abs=2e-6), where
        assert r["drop_low"] <= r["accuracy_drop"] <= r["drop_high"], where
        right = round(r["baseline_accuracy"] * SMALL_EVAL / 100)
        assert (r["drop_low"], r["drop_high"]) == pytest.approx(paired_interval_by_hand(
            SMALL_EVAL, right, r["right_to_wrong"], r["wrong_to_right"]), abs=2e-6), where
    for layer in SMALL_LAYERS:  # more channels pruned never removes fewer parameters
        for c in SMALL_CRITERIA:
            pts = sorted((r for r in rows if (r["layer"], r["criterion"]) == (layer, c)), key=lambda r: r["k"])
            assert pts[0]["params_removed"] < pts[1]["params_removed"]


def test_one_point_by_hand(small_sweep):
    """One row's interval, computed here from its flip counts (printed with -s)."""
    r = max(results(small_sweep.folder), key=lambda r: r["right_to_wrong"] + r["wrong_to_right"])
    right = round(r["baseline_accuracy"] * SMALL_EVAL / 100)
    low, high = paired_interval_by_hand(SMALL_EVAL, right, r["right_to_wrong"], r["wrong_to_right"])
    print(f"\n{r['layer']}/{r['criterion']} K={r['k']}: {SMALL_EVAL} images, {right} right at baseline, "
          f"{r['right_to_wrong']} lost, {r['wrong_to_right']} gained: drop {r['accuracy_drop']:.4f}, "
          f"interval [{low:.4f}, {high:.4f}] by hand, [{r['drop_low']:.4f}, {r['drop_high']:.4f}] in results.csv")
    assert r["right_to_wrong"] > 0  # a point where something flipped
    assert (r["drop_low"], r["drop_high"]) == pytest.approx((low, high), abs=2e-6)


def test_rankings_json_holds_every_trials_order(small_sweep):
    entries = json.loads((small_sweep.folder / "rankings.json").read_text(encoding="utf-8"))
    assert sorted(entries) == sorted(f"{layer}/{c}" for layer in SMALL_LAYERS for c in SMALL_CRITERIA)
    for key, entry in entries.items():
        channels = SMALL_LAYERS[key.split("/")[0]]
        assert sorted(entry["order"]) == list(range(channels)) and len(entry["scores"]) == channels, key
        assert entry["order"] == sorted(range(channels), key=lambda c: entry["scores"][c]), key  # lowest first


def test_config_yaml_holds_resolved_grid_and_provenance(small_sweep):
    doc = yaml.safe_load((small_sweep.folder / "config.yaml").read_text(encoding="utf-8"))
    resolved = load_grid(small_sweep.grid_path).as_dict()  # the fully resolved grid (every key, absolute paths)
    grid = {k: doc.get(k) for k in resolved}
    assert grid == resolved
    assert grid["checkpoint"]["path"] == str(small_sweep.checkpoint)
    assert grid["sweep"]["layers"] == list(SMALL_LAYERS)
    assert grid["sweep"]["k"] == {"fractions": list(SMALL_FRACTIONS)}
    assert grid["sweep"]["retries"] == 2 and grid["resources"]["cpus_per_trial"] == 1  # defaults filled in
    assert Path(grid["data"]["root"]).is_absolute() and Path(grid["output"]).is_absolute()
    prov = doc["provenance"]
    assert prov["checkpoint_sha256"] == sha256(small_sweep.checkpoint)
    assert prov["trials"] == 6 and prov["points"] == 12
    assert {"torch", "ray", "wandb", "numpy"} <= set(prov["versions"])
    started = datetime.fromisoformat(prov["started"])
    assert abs((datetime.now(timezone.utc) - started).total_seconds()) < 3600


def test_plots_report_and_feature_maps(small_sweep):
    folder = small_sweep.folder
    for name in ("accuracy_vs_k.png", "sensitivity.png"):
        data = (folder / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, name
    report = (folder / "report.md").read_text(encoding="utf-8")
    baseline = results(folder)[0]["baseline_accuracy"]
    assert "baseline" in report.lower() and f"{baseline:.2f}%" in report
    for layer in SMALL_LAYERS:
        assert layer in report, layer
        pngs = list((folder / "feature_maps" / layer).glob("*.png"))
        assert pngs and all(p.read_bytes().startswith(b"\x89PNG") for p in pngs), layer
    assert "plots/accuracy_vs_k.png" in report and "plots/sensitivity.png" in report
    # the eval set's size and an image's worth; safe K from the interval's upper end; the hold-out checked
    assert f"on {SMALL_EVAL} synthetic test images" in report and "one image is worth 0.667 points" in report
    assert "have the **upper end** of that interval under the threshold" in report
    assert "the calibration images are among them (checked)" in report
    assert "mean_activation: safe K < 1 / < 5 pts | l1_norm: safe K < 1 / < 5 pts |" in report


# ---- 2. W&B offline runs ----

def test_wandb_offline_runs(small_sweep):
    folder = small_sweep.folder
    rows = {(r["layer"], r["criterion"], r["k"]): r for r in results(folder)}
    baseline = next(iter(rows.values()))["baseline_accuracy"]
    sha = sha256(small_sweep.checkpoint)
    trials, summaries = {}, []
    for run_dir in wandb_run_dirs(folder):
        records = leet_records(run_dir)
        info = run_info(records)
        assert info["run_group"] == "small", run_dir
        exits = [r["exit"]["exit_code"] for r in records if r["type"] == "exit"]
        assert exits == [0], f"{run_dir}: exit records {exits}"
        if info["job_type"] == "summary":
            summaries.append(run_dir)
            continue
        assert info["job_type"] == "prune-eval", run_dir
        name = info["display_name"]
        assert name not in trials, f"two runs named {name}"
        trials[name] = (run_dir, info, history(records))
    assert sorted(trials) == sorted(f"{layer}/{c}" for layer in SMALL_LAYERS for c in SMALL_CRITERIA)

    layer_index = {"layer1.0.conv1": 1, "layer2.0.conv2": 6, "layer3.1.conv1": 13}  # of the 20 convs, shortcuts too
    grid = load_grid(small_sweep.grid_path)
    data = load_data(grid.data, grid.model.num_classes, grid.seed, training=False)
    subsets = {"eval": class_counts(data.test.labels), "calibration": class_counts(data.calibration.labels)}
    same_files: list[Path] = []
    for name, (run_dir, info, hist) in trials.items():
        layer, criterion = name.split("/")
        config = info["config"]["update"]
        assert (config["layer"], config["criterion"], config["target"]) == (layer, criterion, "output")
        assert config["checkpoint_sha256"] == sha
        assert config["baseline_accuracy"] == pytest.approx(baseline, abs=1e-6)  # results.csv: 6 decimals
        # numbers that describe the layer, for the runs table and parallel coordinates; tags to filter by
        channels = SMALL_LAYERS[layer]
        assert (config["layer_index"], config["stage"], config["channels"], config["unit"]) == (
            layer_index[layer], int(layer[5]), channels, "layer")
        assert config["macs"] > 0 and config["checkpoint_artifact"].startswith("checkpoint-")
        assert config["data_subsets"] == subsets and subsets["eval"]["classes"] == 10  # docs/data.md
        assert sorted(info["tags"]) == sorted([f"criterion:{criterion}", "target:output", "unit:layer"])
        # the run's summary describes the layer, not its last K
        summary = leet_summary(run_dir)["summary"]
        pts = sorted((r for r in rows.values() if (r["layer"], r["criterion"]) == (layer, criterion)),
                     key=lambda r: r["k"])
        assert "accuracy" not in summary and "k" not in summary
        assert summary["max_k"] == pts[-1]["k"] and summary["points"] == len(pts)
        assert summary["safe_k_5pt"] in [0] + [p["k"] for p in pts]
        for p in pts:
            assert summary[f"accuracy_at_{fraction_label(p['fraction'])}"] == pytest.approx(p["accuracy"], abs=1e-6)
        assert summary["drop_auc"] == pytest.approx(trial_summary(pts)["drop_auc"], abs=1e-5)
        points = [h for h in hist if "k" in h]
        assert sorted(h["k"] for h in points) == small_ks(SMALL_LAYERS[layer]), name  # every K, once
        for h in points:
            row = rows[(layer, criterion, h["k"])]
            assert h["accuracy"] == pytest.approx(row["accuracy"], abs=1e-6), (name, h["k"])
            assert h["accuracy_drop"] == pytest.approx(row["accuracy_drop"], abs=1e-5), (name, h["k"])
            for image, suffix in (("feature_maps/pruned_layer", "layer"), ("feature_maps/final_stage", "final")):
                assert h.get(f"{image}._type") == "image-file", (name, h["k"], image)
                png = run_dir / "files" / h[f"{image}.path"]
                assert png.read_bytes().startswith(b"\x89PNG"), png
                disk = folder / "feature_maps" / layer / f"{criterion}_k{h['k']:04d}_{suffix}.png"
                if disk.is_file():  # a figure K: W&B got the file written to disk, encoded once
                    assert png.read_bytes() == disk.read_bytes(), (png, disk)
                    same_files.append(disk)

    assert len(same_files) == 2 * len(list(folder.glob("feature_maps/*/*_maps.npz"))) > 0  # every figure
    assert len(summaries) == 1
    summary = leet_summary(summaries[0])
    assert summary["name"] == "summary" and summary["exit_code"] == 0
    s = summary["summary"]
    assert s["baseline_accuracy"] == pytest.approx(baseline, abs=1e-6)
    # the near-chance rule (runner.outputs.report.near_chance): at most 5 points above 100 / 10 classes
    assert s["chance_accuracy"] == 10.0 and s["near_chance"] is (baseline <= 15.0)
    assert ("warning" in s) is (baseline <= 15.0)
    assert s["results"]["_type"] == "table-file" and s["results"]["nrows"] == 12
    table = json.loads((summaries[0] / "files" / s["results"]["path"]).read_text(encoding="utf-8"))
    col = {c: i for i, c in enumerate(table["columns"])}
    got = {(d[col["layer"]], d[col["criterion"]], d[col["k"]]): d[col["accuracy"]] for d in table["data"]}
    assert got.keys() == rows.keys()
    assert all(got[k] == pytest.approx(r["accuracy"], abs=1e-6) for k, r in rows.items())
    # the sweep's outputs, as one artifact of the summary run (its manifest is in the offline run file)
    [results_artifact] = artifacts(leet_records(summaries[0]), "sweep-results")
    assert results_artifact["name"] == "sweep-results-small"
    assert manifest_paths(results_artifact) == ["config.yaml", "plots/accuracy_vs_k.png", "plots/sensitivity.png",
                                                "rankings.json", "report.md", "results.csv"]


# ---- 2b. W&B lineage and --resume: the trained checkpoint, the sweep's results, the same runs continued ----

LINEAGE_LAYERS = ["layer1.0.conv1", "layer2.0.conv2"]


@pytest.fixture(scope="module")
def lineage(ray_session, tmp_path_factory):
    """A sweep that trains its own checkpoint (W&B offline), then --resume with a grid that adds a K: in process,
    on the session's Ray."""
    from runner.job.sweep import Options, run_sweep

    tmp = tmp_path_factory.mktemp("lineage")
    checkpoint = tmp / "own.pt"  # missing: the sweep trains it
    grid = grid_dict(tmp, e2e(checkpoint), name="lineage",
                     sweep={"layers": LINEAGE_LAYERS, "k": [1], "criteria": ["l1_norm"]})
    path = write_grid(tmp / "lineage.yaml", grid)
    first = run_sweep(Options(str(path)))
    grid["sweep"]["k"] = [1, 2]
    write_grid(path, grid)
    second = run_sweep(Options(str(path), resume=True))
    return SimpleNamespace(folder=first.folder, checkpoint=checkpoint, first=first, second=second,
                           runs=runs_by_name(first.folder))


@pytest.mark.slow
def test_training_is_a_run_that_logs_the_checkpoint_as_a_model_artifact(lineage):
    [(run_dir, info, records)] = lineage.runs["train"]  # trained once: the resume found the checkpoint
    assert info["job_type"] == "train"
    curves = [h for h in history(records) if "epoch" in h]
    assert [h["epoch"] for h in curves] == [1] and curves[0]["loss"] > 0 and "train_accuracy" in curves[0]
    [model] = artifacts(records, "model")
    sha = sha256(lineage.checkpoint)
    assert (model["name"], sorted(model["aliases"])) == ("checkpoint-own", sorted(["latest", f"sha256-{sha[:12]}"]))
    assert json.loads(model["metadata"])["sha256"] == sha
    [entry] = model["manifest"]["contents"]
    assert (entry["path"], int(entry["size"])) == ("own.pt", lineage.checkpoint.stat().st_size)
    assert entry["local_path"] == str(lineage.checkpoint)  # read in place when synced (immutable: never copied)
    assert leet_summary(run_dir)["summary"]["checkpoint_artifact"] == f"checkpoint-own:sha256-{sha[:12]}"


@pytest.mark.slow
def test_resume_continues_the_same_runs(lineage):
    assert (lineage.first.points, lineage.second.points, lineage.second.measured) == (2, 4, 2)
    sweep_id = yaml.safe_load((lineage.folder / "config.yaml").read_text(encoding="utf-8"))["sweep_id"]
    names = sorted(lineage.runs)
    assert names == sorted(["train", "summary", *(f"{layer}/l1_norm" for layer in LINEAGE_LAYERS)])
    for name, folders in lineage.runs.items():
        ids = {info["run_id"] for _, info, _ in folders}
        assert len(ids) == 1, (name, ids)  # one W&B run, continued: never a second run of the same name
        assert next(iter(ids)).startswith(f"{sweep_id}-"), name
    for layer in LINEAGE_LAYERS:  # each K logged once over the two processes, and the run ended well each time
        folders = lineage.runs[f"{layer}/l1_norm"]
        assert len(folders) == 2
        assert sorted(h["k"] for _, _, records in folders for h in history(records) if "k" in h) == [1, 2]
        assert [r["exit"]["exit_code"] for _, _, records in folders for r in records if r["type"] == "exit"] == [0, 0]
        assert leet_summary(folders[-1][0])["summary"]["points"] == 2  # the summary covers both processes' points
    summaries = lineage.runs["summary"]
    assert len(summaries) == 2  # one summary run, updated by the resume
    for _, _, records in summaries:
        [results_artifact] = artifacts(records, "sweep-results")
        assert "results.csv" in manifest_paths(results_artifact)
    assert leet_summary(summaries[-1][0])["summary"]["points"] == 4


# ---- 3. interrupted (Ctrl-C), then --resume ----

BIG_KS = [1, 3, 8]
BIG_CRITERIA = ["l1_norm", "random"]  # rankings from weights only: the same in every process


@pytest.mark.slow
def test_interrupt_then_resume_measures_each_point_once(ray_session, sweep_checkpoint, tmp_path):
    from runner.job.sweep import Options, run_sweep

    grid = write_grid(tmp_path / "big.yaml", grid_dict(tmp_path, e2e(sweep_checkpoint), name="big",
                                                       data={"eval_size": 200},
                                                       sweep={"layers": "all", "k": BIG_KS, "criteria": BIG_CRITERIA}))
    total = 17 * len(BIG_KS) * len(BIG_CRITERIA)  # 17 convs without the shortcuts at width 0.125
    folder = tmp_path / "runs" / "big"
    args = ["--grid", str(grid)]

    started = time.time()
    proc = start_cli(args, cwd=tmp_path)
    try:
        while len(results(folder)) < 5:  # a few points in, Ctrl-C (to the process group, as a terminal does)
            assert proc.poll() is None, finish(proc, started, 10).explain()
            assert time.time() - started < 240, "no results after 240 s"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        interrupted = finish(proc, started, 120)
    finally:
        stop_group(proc)
    assert interrupted.returncode == 130, interrupted.explain()
    assert "--resume" in interrupted.stderr, interrupted.explain()
    before = keys(results(folder))
    assert len(before) == len(set(before)) and 5 <= len(before) < total, interrupted.explain()
    # every point measured before Ctrl-C is in results.csv
    assert measured(interrupted) == (len(before), total, len(before))

    resumed = run_cli([*args, "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.explain()
    rows = results(folder)
    assert len(rows) == total and len(set(keys(rows))) == total  # each point exactly once
    assert set(before) <= set(keys(rows))
    # the resumed run measured only the points that were missing
    assert measured(resumed) == (total, total, total - len(before))
    # and continued the same W&B runs: one run (one id) per trial and one summary, read back with W&B's reader
    runs = runs_by_name(folder)
    assert sorted(runs) == sorted(["summary", *{f"{r['layer']}/{r['criterion']}" for r in rows}])
    assert all(len({info["run_id"] for _, info, _ in folders}) == 1 for folders in runs.values()), runs
    for name, folders in runs.items():
        if name != "summary":  # each K logged once, over both processes
            ks = [h["k"] for _, _, records in folders for h in history(records) if "k" in h]
            assert sorted(ks) == sorted(set(ks)) == BIG_KS, name

    reference = run_sweep(Options(str(grid), output=str(tmp_path / "reference")))
    assert (reference.points, reference.failed) == (total, [])
    assert values(folder) == values(reference.folder)  # exactly the numbers of an uninterrupted sweep


# ---- 4. the script, and a crashed trial retried; 5. W&B server down ----

PAIR_LAYERS = {"layer1.0.conv1": 8, "layer2.0.conv2": 16}
PAIR_POINTS = expected_points(PAIR_LAYERS, ["l1_norm"], lambda c: [1, 2])


def pair_grid(tmp: Path, checkpoint: Path, name: str) -> Path:
    return write_grid(tmp / f"{name}.yaml", grid_dict(tmp, e2e(checkpoint), name=name, sweep={
        "layers": list(PAIR_LAYERS), "k": [1, 2], "criteria": ["l1_norm"]}))


@pytest.mark.slow
def test_the_script_runs_a_sweep_and_a_crashed_trial_is_retried(script_sweep):
    """`python scripts/sweep.py` reaches the command and exits with its code (the one subprocess smoke test of the
    wiring, conftest.py); its own Ray's workers see the fault injected through the environment, so one trial
    crashes once."""
    run, folder = script_sweep.run, script_sweep.folder
    assert script_sweep.crashed.is_file(), "the trial never crashed\n" + run.explain()
    assert run.returncode == 0, run.explain()
    assert run.out_lines[-1].startswith("4/4 points (4 measured in this run) in "), run.explain()
    told = [line for line in run.err_lines if "layer2.0.conv2/l1_norm" in line and "retry" in line]
    assert len(told) == 1, run.explain()  # the user is told about the retry, once
    assert "Traceback" not in run.stderr, run.explain()
    assert sorted(keys(results(folder))) == sorted(PAIR_POINTS)  # every point, exactly once
    assert len(wandb_run_dirs(folder)) == 3  # one run per trial (none left behind by the crash) + summary


FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.slow
def test_wandb_server_unreachable(script_sweep):
    """The script's sweep (conftest.py) asks for W&B on auto with a key, so online (--wandb-mode, over the grid's
    offline), and no server listens there: it says so once, naming the server, and falls back to offline runs."""
    run, folder = script_sweep.run, script_sweep.folder
    assert run.returncode == 0, run.explain()
    lines = (run.stdout + run.stderr).replace(str(folder), "<folder>").splitlines()  # (the path holds a test's name)
    told = [line for line in lines if "reachable" in line]
    assert len(told) == 1 and script_sweep.wandb_url in told[0], run.explain()  # told once, naming the server
    assert len([line for line in lines if "W&B" in line or "wandb:" in line.lower()]) == 1, run.explain()
    assert "Traceback" not in run.stderr, run.explain()
    assert len(wandb_run_dirs(folder)) == 3  # the runs fell back to offline (the key: tests/test_security.py)


# ---- 6. random drawn several times; rankings.json reused by --resume ----

DRAWN_LAYERS = {"layer1.0.conv1": 8, "layer2.0.conv2": 16}
DRAWN_CRITERIA = ["l1_norm", "mean_activation", "random"]


def drawn_grid(tmp: Path, checkpoint: Path, name: str, k: list[int], random_seed: int) -> Path:
    return write_grid(tmp / f"{name}-{len(k)}.yaml", grid_dict(
        tmp, e2e(checkpoint), name=name, sweep={"layers": list(DRAWN_LAYERS), "k": k, "criteria": DRAWN_CRITERIA,
                                                "random_repeats": 2, "random_seed": random_seed}))


@pytest.mark.slow
def test_random_repeats_random_seed_and_rankings_json_on_resume(ray_session, sweep_checkpoint, tmp_path):
    from runner.job.sweep import Options, run_sweep

    first = run_sweep(Options(str(drawn_grid(tmp_path, sweep_checkpoint, "drawn", [1, 2], random_seed=0))))
    assert (first.points, first.expected, first.failed) == (16, 16, [])  # 2 layers x 2 K x (1 + 1 + 2 orders)
    rows = results(first.folder)
    drawn = sorted((r["layer"], r["k"], r["repeat"]) for r in rows if r["criterion"] == "random")
    assert drawn == sorted((layer, k, r) for layer in DRAWN_LAYERS for k in (1, 2) for r in (0, 1))
    assert {r["repeat"] for r in rows if r["criterion"] != "random"} == {0}
    entries = json.loads((first.folder / "rankings.json").read_text(encoding="utf-8"))
    for layer, channels in DRAWN_LAYERS.items():
        orders = entries[f"{layer}/random"]["order"]
        assert len(orders) == 2 and orders[0] != orders[1] and sorted(orders[1]) == list(range(channels))
    report = (first.folder / "report.md").read_text(encoding="utf-8")
    assert "## Random orders: mean and spread" in report and "`random` draws 2 orders per layer" in report

    # another random_seed: other random orders, the same calibration images and every other number unchanged
    other = run_sweep(Options(str(drawn_grid(tmp_path, sweep_checkpoint, "reseeded", [1, 2], random_seed=1))))
    again = json.loads((other.folder / "rankings.json").read_text(encoding="utf-8"))
    for layer in DRAWN_LAYERS:
        assert again[f"{layer}/random"]["order"] != entries[f"{layer}/random"]["order"], layer
        for c in ("l1_norm", "mean_activation"):  # mean_activation is measured on the calibration images
            assert again[f"{layer}/{c}"] == entries[f"{layer}/{c}"], (layer, c)
    theirs = {(r["layer"], r["criterion"], r["k"], r["repeat"]): r for r in results(other.folder)}
    ours = {(r["layer"], r["criterion"], r["k"], r["repeat"]): r for r in rows}
    assert theirs.keys() == ours.keys()
    for key, r in ours.items():
        same = (r["accuracy"], r["loss"], r["baseline_accuracy"]) == (theirs[key]["accuracy"], theirs[key]["loss"],
                                                                      theirs[key]["baseline_accuracy"])
        assert same or key[1] == "random", key
    assert any(ours[k]["loss"] != theirs[k]["loss"] for k in ours if k[1] == "random")  # the draws did change

    # --resume reads rankings.json: edit layer2.0.conv2's l1_norm order to mean_activation's, add K = 3, and the
    # new l1_norm point is exactly mean_activation's (whose order is not edited)
    layer = "layer2.0.conv2"
    edited = entries[f"{layer}/mean_activation"]
    assert set(entries[f"{layer}/l1_norm"]["order"][:3]) != set(edited["order"][:3])  # the edit changes K = 3
    entries[f"{layer}/l1_norm"] = {"order": edited["order"], "scores": edited["scores"]}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in entries.items()]
    (first.folder / "rankings.json").write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    resumed = run_sweep(Options(str(drawn_grid(tmp_path, sweep_checkpoint, "drawn", [1, 2, 3], random_seed=0)),
                                resume=True))
    assert (resumed.points, resumed.expected, resumed.measured) == (24, 24, 8)  # only K = 3 was measured
    after = {(r["layer"], r["criterion"], r["k"], r["repeat"]): r for r in results(first.folder)}
    l1, mean = after[(layer, "l1_norm", 3, 0)], after[(layer, "mean_activation", 3, 0)]
    assert (l1["accuracy"], l1["loss"], l1["right_to_wrong"]) == (mean["accuracy"], mean["loss"],
                                                                    mean["right_to_wrong"])
    assert json.loads((first.folder / "rankings.json").read_text(encoding="utf-8")) == entries  # not rewritten


# ---- 7. the Python API (runner.api): sweep(grid) and load_results(folder) as DataFrames ----

def test_load_results_equals_results_csv_row_for_row(small_sweep):
    import csv

    from runner import load_results
    from runner.outputs.results import FLOATS, INTS

    frame = load_results(small_sweep.folder)
    with open(small_sweep.folder / "results.csv", newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    assert list(frame.columns) == list(raw[0]) and len(frame) == len(raw) == 12
    for (_, row), want in zip(frame.iterrows(), raw):  # same order, every cell
        for column, text in want.items():
            got = row[column]
            if column == "per_class_accuracy":
                assert got == [float(v) for v in text.split(";")], column
            elif text == "" and (column in INTS or column in FLOATS):  # nothing measured there (adaptive BN off)
                assert isinstance(got, float) and np.isnan(got), column
            elif column in INTS:
                assert isinstance(got, (int, np.integer)) and got == int(text), column
            elif column in FLOATS:
                assert isinstance(got, float) and got == float(text), column
            else:
                assert got == text, column
    assert str(frame["k"].dtype) == "int64" and str(frame["accuracy"].dtype) == "float64"


def test_load_results_of_a_partial_folder(small_sweep, tmp_path):
    """A sweep still running (or killed) mid-row: the whole rows, nothing else."""
    from runner import load_results

    text = (small_sweep.folder / "results.csv").read_text(encoding="utf-8")
    cut = text[: text.index("\n", len(text) // 2) + 20]  # the header, some rows and part of the next one
    (tmp_path / "results.csv").write_text(cut, encoding="utf-8")
    frame = load_results(tmp_path)
    assert len(frame) == cut.count("\n") - 1 and list(frame["k"]) == [r["k"] for r in results(small_sweep.folder)][
        :len(frame)]


def test_load_results_refuses_a_folder_that_is_not_a_sweeps(tmp_path, monkeypatch):
    """A wrong working directory or folder is one clear error naming the path, not an empty table."""
    from runner import load_results
    from runner.errors import InputError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as err:
        load_results("runs/demo")
    assert str(err.value) == (
        f"load_results(folder): no such folder: got '{tmp_path / 'runs' / 'demo'}'; allowed: the output folder of "
        "a sweep (<output>/<name>/, holding results.csv); fix: check the path, which is relative to the working "
        f"directory {tmp_path}")
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    with pytest.raises(InputError, match=r"^load_results\(folder\): no results.csv in that folder: got '"):
        load_results("runs/demo")
    with pytest.raises(InputError, match=r"^load_results\(folder, tune=True\): no Tune experiment there: got '"):
        load_results("runs/demo", tune=True)


def test_overrides_given_as_one_string_are_one_override(tmp_path):
    """sweep(..., overrides="k=v") is one --set, refused here (before Ray) by the data check it names."""
    from runner import sweep
    from runner.errors import InputError

    path = write_grid(tmp_path / "g.yaml", grid_dict(tmp_path))
    with pytest.raises(InputError) as err:
        sweep(path, overrides="data.eval_size=5000")
    assert str(err.value) == ("--set data.eval_size=5000: data.eval_size: larger than the test split: got 5000; "
                              "allowed: 1 .. 200, or null for all; fix: set data.eval_size: 200 or null")
    assert not (tmp_path / "runs").exists()


def test_the_reports_wandb_line_after_a_resume_whose_first_run_had_wandb_off(tmp_path):
    """Two points measured with W&B off (no W&B folder), then --resume with W&B offline: the report's W&B line
    says that those points are in no W&B run; once W&B runs are in the folder, nothing is missing."""
    from runner.config import parse_grid
    from runner.job.sweep import _unlogged, wandb_words
    from runner.outputs.results import COLUMNS

    grid = parse_grid(grid_dict(tmp_path), "g")
    grid.folder.mkdir(parents=True)
    row = {c: 1 for c in COLUMNS} | {"per_class_accuracy": "50.0", "skipped": 0}
    lines = [",".join(COLUMNS)] + [",".join(str(row[c]) for c in COLUMNS)] * 2
    (grid.folder / "results.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert _unlogged(grid, resume=False) == 0 and _unlogged(grid, resume=True) == 2
    runs = grid.folder / "wandb"
    assert wandb_words(grid, "offline", 2) == (
        f"offline runs in {runs} (upload: `wandb sync {runs}/offline-run-*`); they hold what was measured after "
        "--resume and the summary run, not the 2 points measured before with W&B off")
    assert wandb_words(grid, "disabled", 2) == "off"
    (runs / "offline-run-20261207_120000-abc").mkdir(parents=True)
    assert _unlogged(grid, resume=True) == 0


def test_load_results_gives_tunes_per_trial_table(small_sweep):
    import pandas as pd

    from runner import load_results

    trials = load_results(small_sweep.folder, tune=True)
    assert len(trials) == 6 and set(trials["status"]) == {"TERMINATED"} and set(trials["failures"]) == {0}
    assert sorted(zip(trials["layer"], trials["criterion"])) == sorted(
        (layer, c) for layer in SMALL_LAYERS for c in SMALL_CRITERIA)
    assert set(trials["results"]) == {2} and trials["error_file"].isna().all()  # two K each, reported to Tune
    assert isinstance(trials["ended"].dtype, pd.DatetimeTZDtype) and str(trials["ended"].dt.tz) == "UTC"
    started = datetime.fromtimestamp((small_sweep.folder / "config.yaml").stat().st_mtime, timezone.utc)
    assert all(abs((t - started).total_seconds()) < 3600 for t in trials["ended"])
    # Tune made the deepest layer's trials first (their first point comes soonest), then the others in forward
    # order (the longest first); its trial ids count up in the order it made them
    made = trials.sort_values("trial_id")
    assert list(made["layer"]) == ["layer3.1.conv1"] * 2 + ["layer1.0.conv1"] * 2 + ["layer2.0.conv2"] * 2


@pytest.mark.slow
def test_sweep_of_a_dict_returns_the_commands_numbers(ray_session, script_sweep, tmp_path, monkeypatch):
    """The notebook API on the script's grid (conftest.py) gives the command's numbers. And W&B's own switch wins:
    the grid says auto and a key is there, so W&B would go online, but WANDB_MODE=disabled says no."""
    from runner import sweep

    run, folder = script_sweep.run, script_sweep.folder  # the same grid through the command, in a subprocess
    assert run.returncode == 0, run.explain()
    grid = yaml.safe_load((folder.parent.parent / "crash.yaml").read_text(encoding="utf-8"))
    grid["output"], grid["wandb"] = str(tmp_path / "api"), {"mode": "auto"}
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)  # auto would go online...
    monkeypatch.setenv("WANDB_MODE", "disabled")  # ...but W&B's own switch says no
    frame = sweep(grid)
    assert {(r.layer, r.criterion, r.k): (r.accuracy, r.loss) for r in frame.itertuples()} == values(folder)
    out = tmp_path / "api" / "crash"
    assert frame.attrs["failed"] == [] and frame.attrs["folder"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml", "feature_maps", "plots", "rankings.json",
                                                     "report.md", "results.csv", "tune"]
    assert [p for p in tmp_path.rglob("*") if "wandb" in p.name] == []
    assert "- W&B: off" in (out / "report.md").read_text(encoding="utf-8")


# ---- the timeline a sweep logs at -v (runner.job.timeline) ----

def test_timeline_phases_and_fixed_part():
    from runner.job.timeline import Timeline

    t = Timeline(start=100.0)
    for phase, when in [("imports", 101.5), ("input checks", 102.25), ("first point", 106.0),
                        ("last point", 150.0), ("report", 151.5)]:
        t.mark(phase, when)
    assert t.phases() == {"imports": 1.5, "input checks": 0.75, "first point": 3.75, "last point": 44.0,
                          "report": 1.5}
    assert t.fixed_seconds() == 7.5  # 6.0 to the first point + 1.5 after the last


def test_process_start_is_when_the_process_started():
    import subprocess
    import sys

    spawned = time.time()
    done = subprocess.run([sys.executable, "-c", "import time; from runner.job.timeline import process_start; "
                           "print(process_start(), time.time())"], capture_output=True, text=True, check=True)
    started, answered = map(float, done.stdout.split())
    assert spawned - 0.02 <= started <= answered  # to the clock tick (10 ms), not the whole second of btime
    assert started - spawned < 0.5
