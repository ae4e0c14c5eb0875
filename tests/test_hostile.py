"""Hostile inputs through the command line: each is refused with exit code 2 and one line, and nothing in them
runs (DESIGN §9). Most are caught by --dry-run, which checks the grid, the checkpoint and the data files."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT

from model import checkpoint
from model.resnet import ResNet18
from runner.inputs import checkpoints

SWEEP = str(ROOT / "scripts" / "sweep.py")


def sweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SWEEP, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def refused(done: subprocess.CompletedProcess) -> str:
    """The one error line of a refused command."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def grid_file(tmp: Path, **sections: object) -> Path:
    grid = {"name": "hostile", "model": {"width": 0.125},
            "checkpoint": {"path": str(tmp / "model.pt"), "train": None},
            "data": {"dataset": "synthetic", "synthetic_train": 300, "synthetic_test": 100, "calibration_size": 50},
            "sweep": {"layers": ["layer1.0.conv1"], "k": [1, 2], "criteria": ["l1_norm"]},
            "wandb": {"mode": "disabled"}, "output": str(tmp / "runs")}
    for key, value in sections.items():
        grid[key] = {**grid[key], **value} if isinstance(value, dict) and isinstance(grid.get(key), dict) else value
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(grid), encoding="utf-8")
    return path


def good_checkpoint(path: Path, nan: bool = False) -> None:
    model = ResNet18(width=0.125)
    if nan:
        with torch.no_grad():
            model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
    checkpoints.save(path, model, {"arch": "resnet18", "width": 0.125, "num_classes": 10, "dataset": "synthetic",
                                  "classes": [str(i) for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3})


class Payload:
    """Unpickling this creates a file: proof of code execution if the file appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_a_pickle_payload_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"format": checkpoint.FORMAT, "meta": {}, "state_dict": {}, "x": Payload(marker)},
               tmp_path / "model.pt")
    line = refused(sweep("--grid", str(grid_file(tmp_path)), "--dry-run", cwd=tmp_path))
    assert "holds Python objects that a weights-only load refuses" in line
    assert not marker.exists()


def test_raw_pickle_checkpoint_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "model.pt").write_bytes(pickle.dumps(Payload(marker)))
    line = refused(sweep("--grid", str(grid_file(tmp_path)), "--dry-run", cwd=tmp_path))
    assert "not a PyTorch checkpoint (not a zip archive)" in line
    assert not marker.exists()


def test_yaml_with_python_tags_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "grid.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    line = refused(sweep("--grid", str(path), "--dry-run", cwd=tmp_path))
    assert "not valid YAML (could not determine a constructor for the tag" in line
    assert not marker.exists()


def test_npz_with_object_arrays_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "train.npz", images=np.array([object()] * 4, dtype=object), labels=np.zeros(4))
    np.savez(tmp_path / "test.npz", images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4, np.int64))
    good_checkpoint(tmp_path / "model.pt")
    path = grid_file(tmp_path, data={"dataset": "npz", "train": str(tmp_path / "train.npz"),
                                     "test": str(tmp_path / "test.npz")})
    line = refused(sweep("--grid", str(path), "--dry-run", cwd=tmp_path))
    assert line == (f"error: data.train: holds object arrays (pickled Python objects), which are never loaded: got "
                    f"'{tmp_path / 'train.npz'}'; allowed: numeric arrays and a str classes array; fix: save plain "
                    "arrays with numpy.savez")


def test_labels_out_of_range_are_refused(tmp_path: Path) -> None:
    for name, top in (("train", 9), ("test", 12)):
        np.savez(tmp_path / f"{name}.npz", images=np.zeros((20, 32, 32, 3), np.uint8),
                 labels=np.arange(20) % (top + 1))
    path = grid_file(tmp_path, data={"dataset": "npz", "train": str(tmp_path / "train.npz"),
                                     "test": str(tmp_path / "test.npz")},
                     checkpoint={"train": {"epochs": 1}})
    line = refused(sweep("--grid", str(path), "--dry-run", cwd=tmp_path))
    assert line == ("error: data.test: label out of range: got 12; allowed: labels 0 .. 9 (model.num_classes = 10); "
                    "fix: fix the labels or model.num_classes")


def test_nan_weights_are_reported_not_evaluated(tmp_path: Path) -> None:
    good_checkpoint(tmp_path / "model.pt", nan=True)
    line = refused(sweep("--grid", str(grid_file(tmp_path)), "--dry-run", cwd=tmp_path))
    assert "non-finite weights (NaN or Inf) in 1 tensors, first layer2.0.conv1.weight" in line


def test_nan_weights_stop_a_real_run_before_any_trial(tmp_path: Path) -> None:
    good_checkpoint(tmp_path / "model.pt", nan=True)
    line = refused(sweep("--grid", str(grid_file(tmp_path)), cwd=tmp_path))
    assert "non-finite weights" in line
    assert not (tmp_path / "runs" / "hostile" / "results.csv").exists()


@pytest.mark.parametrize("sweep_section, expected", [
    ({"k": [1, -2]}, "sweep.k[1]: out of range: got -2; allowed: integers >= 1"),
    ({"k": [1, 2.5]}, "sweep.k[1]: wrong type: got 2.5; allowed: a valid integer"),
    ({"batch_size": 2.0}, "sweep.batch_size: wrong type: got 2.0; allowed: a valid integer"),
    ({"k": {"range": [1, 10**15, 1]}}, "sweep.k.range: 999,999,999,999,999 K values is too many"),
    ({"k": {"range": [1, 5000, 1]}}, "sweep.k: K = 4999 is above the 8 output channels of layer1.0.conv1"),
])
def test_bad_k_and_numbers_are_refused(tmp_path: Path, sweep_section: dict, expected: str) -> None:
    good_checkpoint(tmp_path / "model.pt")
    line = refused(sweep("--grid", str(grid_file(tmp_path, sweep=sweep_section)), "--dry-run", cwd=tmp_path))
    assert expected in line
