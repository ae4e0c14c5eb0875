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
from model.zoo import ModelError, Spec
from runner.config import Grid
from runner.errors import InputError
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
    """The grid's checkpoint, checked against its model section."""
    return load_spec(grid.checkpoint.path, spec_of(grid.model))


def existing(grid: Grid) -> Checkpoint | None:
    """The checkpoint, loaded and checked, or None when it is missing and the grid can train it."""
    if not Path(grid.checkpoint.path).is_file():
        if grid.checkpoint.train is None:
            raise InputError(FIELD, grid.checkpoint.path, "no such file, and the grid has no "
                             "checkpoint.train section to train it", "an existing checkpoint, or a recipe",
                             "add checkpoint.train ({recipe: standard, epochs: 30}) or fix the path")
        return None
    return load_for(grid)
