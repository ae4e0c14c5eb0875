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


STATE_KEYS = ("state_dict", "model", "model_state_dict")  # where other code keeps the state_dict
# the widely used CIFAR ResNet-18 code names a block's shortcut conv and BN by position
RENAMES = {"resnet18": ((".shortcut.0.", ".shortcut.conv."), (".shortcut.1.", ".shortcut.bn."))}


def _state(blob: Any) -> dict[str, torch.Tensor] | None:
    """A foreign file's state_dict: the file itself, or under one of STATE_KEYS; `module.` prefixes removed."""
    if isinstance(blob, dict):
        for key in STATE_KEYS:
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
    if not isinstance(blob, dict) or not blob or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                         for k, v in blob.items()):
        return None
    return {k.removeprefix("module."): v for k, v in blob.items()}


def read(path: str | Path, foreign: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The file's metadata and state_dict, loaded with weights_only=True (no code from the file ever runs).

    With `foreign`, a plain state_dict file (or a dict holding one under state_dict, model or
    model_state_dict) is accepted too; its metadata is {"foreign": True}."""
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
    if foreign and not (isinstance(blob, dict) and blob.get("format") == FORMAT):
        state = _state(blob)
        if state is None:
            raise CheckpointError(path, "holds no state_dict (tensors by name, or under state_dict, model or "
                                  "model_state_dict)", "a prune-sweep checkpoint or a state_dict file",
                                  "save the network with torch.save(model.state_dict(), path)")
        return {"foreign": True}, state
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or not isinstance(blob.get("state_dict"), dict) \
            or not isinstance(blob.get("meta"), dict):
        raise _bad(path, "not a prune-sweep checkpoint (no format tag, metadata or state_dict)", retrain)
    return blob["meta"], blob["state_dict"]


def load(path: str | Path, spec: Spec) -> Checkpoint:
    """Load and check a checkpoint against the architecture the grid asks for: ours, or a foreign state_dict
    (meta {"foreign": True}; its normalisation comes from the grid)."""
    meta, state = read(path, foreign=True)
    path = str(path)
    if meta.get("foreign"):
        model = build(spec, pretrained=False)
        for old, new in RENAMES.get(spec.arch, ()):
            state = {k.replace(old, new): v for k, v in state.items()}
        _check_keys(path, model.state_dict(), state)
        return _finish(path, model, state, meta)
    want = {"arch": spec.arch, "width": float(spec.width), "num_classes": spec.num_classes}
    if spec.arch != "resnet18":  # width is ours only
        del want["width"]
    if "kwargs" in meta:  # recorded by checkpoints trained here: the builder's arguments shape the network too
        want["kwargs"] = dict(spec.kwargs)
    have = {k: meta.get(k) for k in want}
    if have != want:
        diff = ", ".join(f"{k} {have[k]!r} (grid: {want[k]!r})" for k in want if have[k] != want[k])
        raise CheckpointError(path, f"architecture mismatch: checkpoint has {diff}",
                              "a checkpoint trained with the grid's model section",
                              "point checkpoint.path at a matching file, or change model: to match it")
    return _finish(path, build(spec, pretrained=False), state, meta)


def _check_keys(path: str, want: dict[str, torch.Tensor], have: dict[str, torch.Tensor]) -> None:
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    if missing or unexpected:
        parts = [f"{len(names)} {what} key{'' if len(names) == 1 else 's'} (first: {', '.join(names[:3])})"
                 for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise CheckpointError(path, f"does not fit the grid's model: {'; '.join(parts)}",
                              "a state_dict of the grid's model", "set model: to the network the file was saved "
                              "from, or rename its keys")


def _finish(path: str, model: nn.Module, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Checkpoint:
    want = model.state_dict()
    _check_keys(path, want, state)
    differ = [k for k, v in state.items() if k in want and v.shape != want[k].shape]
    if differ:
        first = differ[0]
        count = "1 tensor differs" if len(differ) == 1 else f"{len(differ)} tensors differ"
        raise CheckpointError(path, f"{count} in shape from the grid's model (first: {first} "
                              f"is {list(state[first].shape)} in the file, {list(want[first].shape)} in the model)",
                              "tensors of the network the model section builds",
                              "make model.arch and model.kwargs build the network the checkpoint was trained as "
                              "(check model.kwargs for a misspelt argument: some builders ignore unknown ones), or "
                              "point checkpoint.path at a checkpoint of this model")
    model.load_state_dict(state, strict=True)
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(path, f"non-finite weights (NaN or Inf) in {len(broken)} tensors, first {broken[0]}",
                              "finite weights", "retrain: the training run diverged or the file was damaged")
    return Checkpoint(model.eval(), meta, sha256(path), path)
