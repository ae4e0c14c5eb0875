"""One Ray Tune trial: a (layer, criterion), its K values as steps (DESIGN §7).

The checkpoint, the eval images and the rankings arrive once through the object store
(`tune.with_parameters`). The trial builds the network on its device, caches the activations at the mask
point, and reports every K to Tune as soon as it is measured, with a small Tune checkpoint naming the K values
done, so that a retried or resumed trial carries on where it stopped.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.layers import ConvInfo
from model.resnet import build
from runner.criteria import Ranking
from runner.data import Images
from runner.device import tune_allocator, uses_channels_last
from runner.engine import EvalSet, Point, sweep_layer

CRASH_ENV = "PRUNE_SWEEP_CRASH_ONCE"  # tests: "<layer>/<criterion>:<marker file>" makes that trial fail once


@dataclass(frozen=True)
class Shared:
    """Everything every trial needs, put in the object store once."""

    arch: str
    width: float
    num_classes: int
    state_dict: dict[str, torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_images: Images
    convs: dict[str, ConvInfo]
    rankings: dict[tuple[str, str], Ranking]
    ks: dict[tuple[str, str], tuple[int, ...]]  # per trial
    done: frozenset[tuple[str, str, int]]  # points already in results.csv (resume)
    batch_size: int
    cache_bytes: int | None
    feature_maps: bool


def point_metrics(point: Point) -> dict[str, Any]:
    """A point as Tune metrics: scalars, plus the mean feature maps as float16 arrays."""
    return {
        "layer": point.layer, "criterion": point.criterion, "target": point.target, "k": point.k,
        "channels": point.channels, "fraction": point.fraction, "accuracy": point.accuracy, "loss": point.loss,
        "per_class_accuracy": list(point.per_class), "params_removed": point.params_removed,
        "macs_removed": point.macs_removed, "seconds": point.seconds,
        "maps": {name: m.astype(np.float16) for name, m in point.maps.items()},
    }


def _checkpoint_ks() -> set[int]:
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return set()
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, "done.json")) as f:
            return set(json.load(f)["k"])


def _maybe_crash(key: str, k: int) -> None:
    """Fault injection for tests: fail once, in the middle of the named trial."""
    spec = os.environ.get(CRASH_ENV, "")
    target, _, marker = spec.partition(":")
    if target == key and marker and not os.path.exists(marker):
        open(marker, "w").close()
        if os.environ.get(CRASH_ENV + "_HARD"):
            os._exit(1)  # a process death, not an exception
        raise RuntimeError(f"injected failure in {key} at K={k}")


def run_trial(config: dict[str, Any], shared: Shared) -> None:
    """The Tune trainable."""
    from ray import tune

    tune_allocator()
    context = tune.get_context()
    cpus = int(context.get_trial_resources().required_resources.get("CPU", 1)) if context else 1
    torch.set_num_threads(max(1, cpus))
    import ray

    device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    layer, criterion = config["layer"], config["criterion"]
    key = f"{layer}/{criterion}"
    done_before = {k for (l_, c_, k) in shared.done if (l_, c_) == (layer, criterion)} | _checkpoint_ks()
    ks = [k for k in shared.ks[(layer, criterion)] if k not in done_before]
    if not ks:
        return
    model = build(shared.arch, shared.width, shared.num_classes)
    model.load_state_dict(shared.state_dict)
    model = model.to(device).eval()
    if uses_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    evalset = EvalSet.build(shared.eval_images, shared.mean, shared.std, shared.num_classes, device,
                            shared.batch_size)
    conv = shared.convs[layer]
    finished = set(done_before)
    for point in sweep_layer(model, conv, config["target"], shared.rankings[(layer, criterion)], ks, evalset,
                             shared.convs, shared.cache_bytes, shared.feature_maps):
        _maybe_crash(key, point.k)
        finished.add(point.k)
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "done.json"), "w") as f:
                json.dump({"k": sorted(finished)}, f)
            metrics = point_metrics(point) | {"node": ray.get_runtime_context().get_node_id()[:12],
                                              "device": str(device)}
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
