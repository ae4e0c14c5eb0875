"""The shared checkpoint of a grid: loaded and checked, and written atomically (training it: runner.inputs.train).

`model.checkpoint` reads files and says what is wrong with them; here that becomes the one-line input error
naming `checkpoint.path`, and the grid decides whether a missing file is trained or refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from model import checkpoint as files
from model.checkpoint import Checkpoint, CheckpointError
from model.zoo import ModelError, Spec
from runner.config import Grid
from runner.errors import InputError
from runner.inputs.data import Holdout
from runner.inputs.models import spec_of
from runner.storage import atomic_path

FIELD = "checkpoint.path"


def save(path: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> str:
    """Write a checkpoint whole or not at all; returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(files.payload(model, meta), tmp)
    return files.sha256(path)


def load(path: str | Path, arch: str, width: float = 1.0, num_classes: int = 10) -> Checkpoint:
    """A checkpoint of one of our architectures (`load_spec` for any model)."""
    return load_spec(path, Spec(arch, float(width), num_classes))


def load_spec(path: str | Path, spec: Spec) -> Checkpoint:
    """`model.checkpoint.load`, with its problems as one-line input errors."""
    try:
        return files.load(path, spec)
    except CheckpointError as e:
        raise InputError(FIELD, e.path, e.problem, e.allowed, e.fix) from None
    except ModelError as e:
        raise InputError(f"model.{e.field}", e.value, e.problem, e.allowed, e.fix) from None


def load_for(grid: Grid) -> Checkpoint:
    """The grid's checkpoint, checked against its model section; a foreign one (a plain state_dict) takes its
    normalisation and image size from the grid's data section, which must then give them."""
    loaded = load_spec(grid.checkpoint.path, spec_of(grid.model))
    data = grid.data
    if loaded.meta.get("foreign"):
        need = [f"data.{k}" for k in ("mean", "std", "image_size") if getattr(data, k) is None]
        if need:
            raise InputError(need[0], None, "a plain state_dict carries no normalisation or image size",
                             "per-channel mean and std in [0, 1] units, and the image side in pixels",
                             f"add {', '.join(need)} to the grid (e.g. mean: [0.485, 0.456, 0.406], "
                             "std: [0.229, 0.224, 0.225], image_size: 224)")
    if data.mean is not None or data.std is not None:
        meta = dict(loaded.meta)
        meta.update({k: list(getattr(data, k)) for k in ("mean", "std") if getattr(data, k) is not None})
        loaded = replace(loaded, meta=meta)
    return loaded


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
