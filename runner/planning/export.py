"""A pruned model as files: `pruned.pt` (state_dict + plan, no pickled code) and `pruned.onnx`.

`pruned.pt` holds the pruned network's state_dict, the removal that made it ({conv name: base model channel
indices}) and plain metadata (the base model's config, normalisation, image size). It is read with
`weights_only=True`, and the network is rebuilt from the base architecture: build the base, remove the same
channels with Torch-Pruning, load the state_dict. No code comes from the file, and a plan edited into
something impossible (K above a unit's channels) is one line (InputError), not a traceback.

`pruned.onnx` takes float32 NCHW images in [0, 1] and returns logits: the normalisation (mean, std) is inside
the graph, so onnxruntime alone reproduces the predictions.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from model.zoo import ModelError, Spec, build
from runner.errors import InputError
from runner.planning.removal import Removal, check_removal, remove_channels
from runner.storage import atomic_path

FORMAT = "prune-sweep/pruned/1"
OPSET = 17
REBUILD = "write it again with prune-sweep prune"


@dataclass(frozen=True)
class Pruned:
    model: nn.Module  # eval mode, CPU
    removal: dict[str, list[int]]
    meta: dict[str, Any]


def save_pruned(path: Path, model: nn.Module, removal: Removal, meta: Mapping[str, Any]) -> None:
    """Write pruned.pt atomically: format tag, removal, metadata (JSON-like values only), CPU state_dict."""
    payload = {"format": FORMAT, "removal": {u: [int(i) for i in idxs] for u, idxs in removal.items()},
               "meta": dict(meta),
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def _read(path: Path) -> dict[str, Any]:
    def bad(problem: str) -> InputError:
        return InputError("pruned.pt", str(path), problem, f"a {FORMAT} file written by prune-sweep prune",
                          REBUILD)

    if not os.path.isfile(path):
        raise bad("no such file")
    if not zipfile.is_zipfile(path):
        raise bad("not a PyTorch file (not a zip archive)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise bad(f"cannot be read weights-only ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise bad("not a pruned model (no format tag)")
    removal = payload.get("removal")
    if not isinstance(removal, dict) or not all(isinstance(v, list) for v in removal.values()):
        raise bad("its plan is not {conv name: [channel indices]}")
    return payload


def spec_meta(spec: Spec, image_size: int) -> dict[str, Any]:
    """What pruned.pt's metadata must hold for `open_pruned` to rebuild the base architecture."""
    return {"spec": {"arch": spec.arch, "width": spec.width, "num_classes": spec.num_classes,
                     "kwargs": dict(spec.kwargs), "weights": spec.weights, "python_path": spec.python_path},
            "image_size": image_size}


def pruned_meta(path: Path) -> dict[str, Any]:
    """pruned.pt's metadata alone (what it was planned from: `base_checkpoint_sha256`, `classes`, `image_size`)."""
    return dict(_read(Path(path)).get("meta", {}))


def open_pruned(path: Path) -> Pruned:
    """pruned.pt on its own: the base architecture its metadata names (`spec_meta`) built without weights, then
    `load_pruned`. What a user calls in a fresh process: `open_pruned("runs/x/plans/macs0.5-knapsack/pruned.pt")`.
    """
    meta = _read(Path(path)).get("meta", {})
    try:
        spec = Spec(**meta["spec"])
        image_size = int(meta["image_size"])
    except (KeyError, TypeError, ValueError):
        raise InputError("pruned.pt", str(path), "its metadata does not name the base architecture",
                         "a file written by prune-sweep prune", REBUILD) from None
    try:
        base = build(spec, pretrained=False)
    except ModelError as e:
        raise InputError(f"pruned.pt: model.{e.field}", e.value, e.problem, e.allowed, e.fix) from None
    return load_pruned(path, base, image_size)


def load_pruned(path: Path, base: nn.Module, image_size: int) -> Pruned:
    """The pruned network rebuilt from a freshly built `base` (modified in place): the file's removal applied
    with Torch-Pruning, then its state_dict loaded (strict). Problems with the file are one-line InputErrors."""
    payload = _read(Path(path))
    removal = payload["removal"]
    try:
        check_removal(base, removal, field="plan")
    except InputError as e:
        raise e.at(str(path)) from None
    model = remove_channels(base, removal, image_size)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()
        raise InputError("pruned.pt", str(path), "its state_dict does not fit the network its plan rebuilds "
                         f"({first[1].strip() if len(first) > 1 else first[0][:120]})",
                         "the state_dict saved with that plan", REBUILD) from None
    return Pruned(model.eval(), {u: list(v) for u, v in removal.items()}, dict(payload.get("meta", {})))


class Normalised(nn.Module):
    """A network that takes [0, 1] images: (x - mean) / std per channel first (as runner.engine.images does)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


def export_onnx(path: Path, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                image_size: int, opset: int = OPSET) -> None:
    """Write the network, normalisation inside, as ONNX: input `images` float32 [N, 3, H, W] in [0, 1] (N
    dynamic), output `logits`, one self-contained file.

    The TorchScript exporter (`dynamo=False`, deprecated since torch 2.9 but present): the torch.export one needs
    onnxscript, starts at opset 18 and writes the weights to a second file; its warning is silenced here."""
    wrapped = Normalised(model, mean, std).eval()
    example = torch.rand(1, len(mean), image_size, image_size)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(wrapped, (example,), str(tmp), opset_version=opset, dynamo=False,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})


ONNX_BATCH = 1000  # images per onnxruntime call when scoring a whole set


def onnx_predictions(path: Path, images: np.ndarray) -> np.ndarray:
    """The class onnxruntime alone predicts for each uint8 NHWC image (as the datasets hold them)."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255
    return np.concatenate([onnx_logits(path, x[i:i + ONNX_BATCH]).argmax(1) for i in range(0, len(x), ONNX_BATCH)])


def onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits from onnxruntime alone (CPU) for float32 NCHW images in [0, 1]."""
    import onnxruntime  # only where an ONNX file is checked

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]
