"""One Ray Tune trial: a (layer, criterion), its K values as steps (DESIGN §7).

The checkpoint, the eval images and the rankings arrive once through the object store
(`tune.with_parameters`). The trial builds the network on its device, caches the activations at the mask
point, measures its own baseline (K = 0) through that cache, and reports every K (every repeat of a random
order) to Tune as soon as it is measured, with its drop and paired interval against that baseline. A retried
or resumed trial first asks the driver's progress board which of its points are already in results.csv, and
measures only the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.layers import ConvInfo
from model.resnet import build
from runner.engine.criteria import Ranking
from runner.engine.device import compute_dtype, place, tune_allocator
from runner.engine.images import Images
from runner.engine.measure import EvalSet, Point, sweep_layer
from runner.outputs.results import TrialId

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
    ks: dict[tuple[str, str], tuple[int, ...]]  # per trial (each measured for every order of its ranking)
    board: str  # name of the driver's ProgressBoard actor
    batch_size: int
    cache_bytes: int | None
    feature_maps: bool


def point_metrics(point: Point) -> dict[str, Any]:
    """A point as Tune metrics: scalars, plus the mean feature maps as float16 arrays."""
    return {
        "layer": point.layer, "criterion": point.criterion, "target": point.target, "k": point.k,
        "repeat": point.repeat, "channels": point.channels, "fraction": point.fraction, "accuracy": point.accuracy,
        "loss": point.loss, "baseline_accuracy": point.baseline_accuracy, "accuracy_drop": point.accuracy_drop,
        "drop_low": point.drop_low, "drop_high": point.drop_high, "right_to_wrong": point.right_to_wrong,
        "wrong_to_right": point.wrong_to_right, "eval_images": point.eval_images,
        "per_class_accuracy": list(point.per_class), "params_removed": point.params_removed,
        "macs_removed": point.macs_removed, "seconds": point.seconds,
        "maps": {name: m.astype(np.float16) for name, m in point.maps.items()},
    }


class ProgressBoard:
    """The driver's record of finished points (results.csv), readable by trials on any node: a named Ray
    actor, so that a trial restarted after a crash or a resume skips what is already measured."""

    def __init__(self, done: list[tuple[str, str, int, int]]) -> None:
        self.done: dict[tuple[str, str], set[tuple[int, int]]] = {}
        self.measured = 0  # points measured in this run, measured again by a retried trial included
        for layer, criterion, k, repeat in done:
            self.done.setdefault((layer, criterion), set()).add((k, repeat))

    def record(self, layer: str, criterion: str, k: int, repeat: int) -> None:
        """A point was measured (perhaps again, by a retried trial)."""
        self.done.setdefault((layer, criterion), set()).add((k, repeat))
        self.measured += 1

    def measured_count(self) -> int:
        return self.measured

    def finished(self, layer: str, criterion: str) -> list[tuple[int, int]]:
        """(K, repeat) of the trial's points already in results.csv."""
        return sorted(self.done.get((layer, criterion), ()))


def board_actor(name: str, done: list[tuple[str, str, int, int]]):
    """Start the named board (replacing one left by an earlier driver of the same sweep), on the driver's own
    node: losing another node of a cluster then costs only the trials that ran there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        ray.kill(ray.get_actor(name))
    except ValueError:
        pass
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ProgressBoard).options(name=name, lifetime=None,
                                                         scheduling_strategy=here).remote(done)


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
    key = TrialId(layer, criterion).key
    ranking = shared.rankings[(layer, criterion)]
    done_before = {tuple(p) for p in ray.get(ray.get_actor(shared.board).finished.remote(layer, criterion))}
    ks = shared.ks[(layer, criterion)]
    if all((k, r) in done_before for k in ks for r in range(ranking.repeats)):
        return
    model = build(shared.arch, shared.width, shared.num_classes)
    model.load_state_dict(shared.state_dict)
    model = place(model, device)
    evalset = EvalSet.build(shared.eval_images, shared.mean, shared.std, shared.num_classes, device,
                            shared.batch_size)
    where = {"node": ray.get_runtime_context().get_node_id()[:12], "device": str(device),
             "dtype": str(compute_dtype(device)).removeprefix("torch.")}
    for point in sweep_layer(model, shared.convs[layer], config["target"], ranking, ks, evalset, shared.convs,
                             shared.cache_bytes, shared.feature_maps, done=done_before):
        _maybe_crash(key, point.k)
        tune.report(point_metrics(point) | where)
