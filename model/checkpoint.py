"""Checkpoint files: one file = state_dict + metadata, written atomically, read weights-only, named by sha256."""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.resnet import ResNet18, build
from runner.errors import InputError

FORMAT = "prune-sweep/checkpoint/1"
FIELD = "checkpoint.path"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the network (eval mode, CPU), its metadata, and the file's sha256."""

    model: ResNet18
    meta: dict[str, Any]
    sha256: str
    path: str


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(path: str | Path, model: ResNet18, meta: dict[str, Any]) -> str:
    """Write atomically (temp file in the same folder, then rename); returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "meta": meta, "state_dict": state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256(path)


def _bad(path: str, problem: str, fix: str) -> InputError:
    return InputError(FIELD, path, problem, "a checkpoint written by scripts/train.py", fix)


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The file's metadata and state_dict, loaded with weights_only=True (no code from the file ever runs)."""
    path = str(path)
    retrain = "delete it and run scripts/train.py --grid FILE (or the sweep, with a checkpoint.train section)"
    if not os.path.isfile(path):
        raise InputError(FIELD, path, "no such file", "an existing checkpoint file",
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


def load(path: str | Path, arch: str, width: float, num_classes: int) -> Checkpoint:
    """Load and check a checkpoint against the architecture the grid asks for."""
    meta, state = read(path)
    path = str(path)
    want = {"arch": arch, "width": float(width), "num_classes": num_classes}
    have = {k: meta.get(k) for k in want}
    if have != want:
        diff = ", ".join(f"{k} {have[k]!r} (grid: {want[k]!r})" for k in want if have[k] != want[k])
        raise InputError(FIELD, path, f"architecture mismatch: checkpoint has {diff}",
                         "a checkpoint trained with the grid's model section",
                         "point checkpoint.path at a matching file, or change model: to match it")
    model = build(arch, width, num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise InputError(FIELD, path, f"shape mismatch ({first.strip()[:160]})", "tensors of the grid's model",
                         "retrain the checkpoint for this model") from None
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise InputError(FIELD, path, f"non-finite weights (NaN or Inf) in {len(broken)} tensors, first {broken[0]}",
                         "finite weights", "retrain: the training run diverged or the file was damaged")
    return Checkpoint(model.eval(), meta, sha256(path), path)
