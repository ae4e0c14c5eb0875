"""scripts/gpu_check.sh, the GPU readiness check: its parts here, and (slow) the whole script with --dry, which runs
every step on the CPU (the same code paths: bench, bf16-vs-fp32 comparison, a sweep with gpus_per_trial: auto,
the report)."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
from conftest import ROOT
from e2e_helpers import cli_env

from runner.config import parse_grid


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_samples_count_trial_processes_not_the_driver():
    text = "\n".join(["sample 1.0 driver 100", "100", "sample 1.2 driver 100", "100", "201", "202",
                      "sample 1.4 driver 100", "100", "201", "202", "203", "204", "sample 1.6 driver ",
                      "No running processes found", "sample 1.8 driver 100", "201, 1024"])
    assert gpu_check().gpu_samples(text) == [set(), {201, 202}, {201, 202, 203, 204}, set(), {201}]


def test_max_overlap():
    overlap = gpu_check().max_overlap
    assert overlap([(0, 10), (1, 9), (2, 8), (3, 7), (11, 12)]) == 4
    assert overlap([(0, 1), (1, 2), (2, 3)]) == 1  # one ends as the next starts
    assert overlap([]) == 0


@pytest.mark.parametrize("dry", [False, True])
def test_the_checks_grid_is_valid(tmp_path, dry):
    data = tmp_path / "cifar"
    data.mkdir()
    for name in ("cifar10-train.npz", "cifar10-test.npz"):
        (data / name).write_bytes(b"")
    grid = parse_grid(gpu_check().grid_for(tmp_path, data, dry), "gpu_check")
    assert grid.data.dataset == "npz" and grid.resources.gpus_per_trial == "auto"
    assert grid.model.width == (0.125 if dry else 1.0) and grid.wandb.mode == "disabled"
    assert parse_grid(gpu_check().grid_for(tmp_path, tmp_path / "none", dry), "g").data.dataset == "synthetic"


def test_report_fails_on_a_missing_or_failed_step(tmp_path):
    check = gpu_check()
    (tmp_path / "prepare.json").write_text(json.dumps({"dataset": "npz", "width": 1.0, "train_seconds": 30}))
    (tmp_path / "agree.json").write_text(json.dumps({
        "engine_precision": "bf16 autocast", "eval_images": 10000, "max_abs_difference": 0.8, "tolerance": 0.5,
        "ok": False, "points": [{"layer": "conv1", "k": 8, "engine": 90.1, "fp32": 90.9}]}))
    lines, ok = check.report(tmp_path)
    assert not ok
    assert lines[0].startswith("prepare: ok  data npz, width 1")
    assert lines[1] == f"bench: FAILED (no result; see {tmp_path}/bench.log)"
    assert lines[2].startswith("agree: FAILED  bf16 autocast vs fp32 on 10000 images, max |diff| 0.80 pts")


@pytest.mark.slow
def test_the_dry_run_passes_on_the_cpu(tmp_path):
    """The whole script, --dry: about two minutes on 2 cores."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=cli_env(), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "gpu_check: PASSED (dry run, CPU)", done.stdout
    for step in ("prepare", "bench", "agree", "sweep", "share"):
        assert json.loads((tmp_path / f"{step}.json").read_text()), step
    agree = json.loads((tmp_path / "agree.json").read_text())
    assert len(agree["points"]) == 6 and agree["max_abs_difference"] <= agree["tolerance"]
    share = json.loads((tmp_path / "share.json").read_text())
    assert share["devices"] == ["cpu"] and share["trials"] == 4 and share["points"] == 16
