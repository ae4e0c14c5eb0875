"""The shared checkpoint of a grid: loaded and checked, and written atomically (training it: runner.inputs.train).

`model.checkpoint` reads files and says what is wrong with them; here that becomes the one-line input error
naming `checkpoint.path`, and the grid decides whether a missing file is trained or refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model import checkpoint as files
from model.checkpoint import Checkpoint, CheckpointError
from runner.config import Grid
from runner.errors import InputError
from runner.inputs.data import Holdout
from runner.storage import atomic_path

FIELD = "checkpoint.path"


def save(path: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> str:
    """Write a checkpoint whole or not at all; returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(files.payload(model, meta), tmp)
    return files.sha256(path)


def load(path: str | Path, arch: str, width: float, num_classes: int) -> Checkpoint:
    """`model.checkpoint.load`, with its problems as one-line input errors."""
    try:
        return files.load(path, arch, width, num_classes)
    except CheckpointError as e:
        raise InputError(FIELD, e.path, e.problem, e.allowed, e.fix) from None


def load_for(grid: Grid) -> Checkpoint:
    """The grid's checkpoint, checked against its model section."""
    return load(grid.checkpoint.path, grid.model.arch, grid.model.width, grid.model.num_classes)


def existing(grid: Grid) -> Checkpoint | None:
    """The checkpoint, loaded and checked, or None when it is missing and the grid can train it."""
    if not Path(grid.checkpoint.path).is_file():
        if grid.checkpoint.train is None:
            raise InputError(FIELD, grid.checkpoint.path, "no such file, and the grid has no "
                             "checkpoint.train section to train it", "an existing checkpoint, or a recipe",
                             "add checkpoint.train ({recipe: standard, epochs: 30}) or fix the path")
        return None
    return load_for(grid)


HOLDOUT_KEY = "calibration_holdout"  # the checkpoint metadata's record of the images it was trained without


def check_holdout(grid: Grid, loaded: Checkpoint, holdout: Holdout | None) -> str:
    """Whether the calibration images are ones the checkpoint was trained without: "checked" (they are),
    "test" (the grid ranks on the test images), "foreign" (checkpoint.foreign: not ours to check) or "unknown"
    (a checkpoint trained before prune-sweep recorded its hold-out, or a hold-out not known yet). A checkpoint
    trained without other images is refused: its training set may hold this sweep's calibration images."""
    if grid.sweep.calibration == "test":
        return "test"
    if grid.checkpoint.foreign:
        return "foreign"
    record = loaded.meta.get(HOLDOUT_KEY)
    if not isinstance(record, dict) or holdout is None:
        return "unknown"
    if record.get("sha256") == holdout.sha256:
        return "checked"
    try:
        then = Holdout(**record).describe()
    except TypeError:
        then = repr(record)
    raise InputError(FIELD, grid.checkpoint.path, f"trained without the calibration hold-out {then}, but this sweep "
                     f"holds out {holdout.describe()}, so its calibration images may have been trained on",
                     "a checkpoint trained with the sweep's hold-out (same seed, data.calibration_size and train "
                     "images)", f"set seed: {record.get('seed')} and data.calibration_size: {record.get('size')} "
                     "as when it was trained, or retrain it, or set checkpoint.foreign: true (or sweep.calibration: "
                     "test) to rank on these images anyway")
