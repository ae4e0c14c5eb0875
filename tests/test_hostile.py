"""Hostile inputs through the command line: each is refused with exit code 2 and one line, and nothing in them
runs. What the readers refuse on their own (pickles in checkpoints, Python tags in YAML, object arrays,
absurd K) is proved by the unit tests of tests/test_checkpoint.py, test_config.py and test_data.py; here, that the
command runs those checks before it computes anything."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import yaml
from e2e_helpers import grid_dict, refused

from model.resnet import ResNet18
from runner.inputs import checkpoints


def grid_file(tmp: Path, **sections: object) -> Path:
    grid = grid_dict(tmp, {"name": "hostile", "checkpoint": {"path": str(tmp / "model.pt"), "train": None},
                           "sweep": {"layers": ["layer1.0.conv1"], "k": [1, 2], "criteria": ["l1_norm"]},
                           "wandb": {"mode": "disabled"}}, **sections)
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
        import os

        return (os.system, (f"touch {self.marker}",))


def test_raw_pickle_checkpoint_is_refused_and_never_run(cli, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "model.pt").write_bytes(pickle.dumps(Payload(marker)))
    line = refused(cli(["--grid", str(grid_file(tmp_path)), "--dry-run"], cwd=tmp_path))
    assert "not a PyTorch checkpoint (not a zip archive)" in line
    assert not marker.exists()


def test_labels_out_of_range_are_refused_by_the_dry_run(cli, tmp_path: Path) -> None:
    for name, top in (("train", 9), ("test", 12)):
        np.savez(tmp_path / f"{name}.npz", images=np.zeros((20, 32, 32, 3), np.uint8),
                 labels=np.arange(20) % (top + 1))
    path = grid_file(tmp_path, data={"dataset": "npz", "train": str(tmp_path / "train.npz"),
                                     "test": str(tmp_path / "test.npz")},
                     checkpoint={"train": {"epochs": 1}})
    line = refused(cli(["--grid", str(path), "--dry-run"], cwd=tmp_path))
    assert line == ("error: data.test: label out of range: got 12; allowed: labels 0 .. 9 (model.num_classes = 10); "
                    "fix: fix the labels or model.num_classes")


def test_nan_weights_stop_a_real_run_before_any_trial(cli, tmp_path: Path, monkeypatch) -> None:
    from runner.job import cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a checkpoint that cannot be evaluated")

    monkeypatch.setattr(cluster, "start_ray", no_ray)
    good_checkpoint(tmp_path / "model.pt", nan=True)
    line = refused(cli(["--grid", str(grid_file(tmp_path))], cwd=tmp_path))
    assert "non-finite weights (NaN or Inf) in 1 tensors, first layer2.0.conv1.weight" in line
    assert not (tmp_path / "runs" / "hostile" / "results.csv").exists()
