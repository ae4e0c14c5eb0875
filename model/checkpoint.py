"""Checkpoint files: one file = state_dict + metadata, read weights-only, named by sha256.

Problems raise `CheckpointError` (what is wrong, and the fix); the runner turns it into its one-line input
error. Writing a checkpoint (atomically) is the runner's job: `runner.inputs.checkpoints.save`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torch import nn

from model.zoo import Spec, build

FORMAT = "prune-sweep/checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the network (eval mode, CPU), its metadata, and the file's sha256."""

    model: nn.Module
    meta: dict[str, Any]
    sha256: str
    path: str

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) the network was trained with, in [0, 1] pixel units."""
        return tuple(self.meta["mean"]), tuple(self.meta["std"])


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: what is wrong with it, what is allowed, and the fix."""

    def __init__(self, path: str, problem: str, allowed: str, fix: str) -> None:
        self.path, self.problem, self.allowed, self.fix = path, problem, allowed, fix
        super().__init__(f"{path}: {problem}")


def _bad(path: str, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(path, problem, "a checkpoint written by scripts/train.py", fix)


def payload(model: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint file holds: a format tag, the metadata and the state_dict (CPU tensors only)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "meta": meta, "state_dict": state}


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The file's metadata and state_dict, loaded with weights_only=True (no code from the file ever runs)."""
    path = str(path)
    retrain = "delete it and run scripts/train.py --grid FILE (or the sweep, with a checkpoint.train section)"
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file", "an existing checkpoint file",
                              "run scripts/train.py --grid FILE, or add a checkpoint.train section to train it")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"
        raise _bad(path, "truncated or corrupt (an incomplete zip archive)" if zip_start
                   else "not a PyTorch checkpoint (not a zip archive)", retrain)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = "holds Python objects that a weights-only load refuses" if "weights_only" in str(e).lower() \
            or "Unsupported" in str(e) else "unreadable"
        raise _bad(path, f"not a prune-sweep checkpoint ({what})", retrain) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise _bad(path, f"truncated or corrupt ({type(e).__name__})", retrain) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or not isinstance(blob.get("state_dict"), dict) \
            or not isinstance(blob.get("meta"), dict):
        raise _bad(path, "not a prune-sweep checkpoint (no format tag, metadata or state_dict)", retrain)
    return blob["meta"], blob["state_dict"]


def load(path: str | Path, spec: Spec) -> Checkpoint:
    """Load and check a checkpoint against the architecture the grid asks for."""
    meta, state = read(path)
    path = str(path)
    want = {"arch": spec.arch, "width": float(spec.width), "num_classes": spec.num_classes}
    if spec.arch != "resnet18":  # width is ours only
        del want["width"]
    have = {k: meta.get(k) for k in want}
    if have != want:
        diff = ", ".join(f"{k} {have[k]!r} (grid: {want[k]!r})" for k in want if have[k] != want[k])
        raise CheckpointError(path, f"architecture mismatch: checkpoint has {diff}",
                              "a checkpoint trained with the grid's model section",
                              "point checkpoint.path at a matching file, or change model: to match it")
    model = build(spec, pretrained=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise CheckpointError(path, f"shape mismatch ({first.strip()[:160]})", "tensors of the grid's model",
                              "retrain the checkpoint for this model") from None
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(path, f"non-finite weights (NaN or Inf) in {len(broken)} tensors, first {broken[0]}",
                              "finite weights", "retrain: the training run diverged or the file was damaged")
    return Checkpoint(model.eval(), meta, sha256(path), path)
