"""One Ray Tune trial: a (layer, criterion), its K values as steps.

The checkpoint, the eval images and the rankings arrive once through the object store
(`tune.with_parameters`). The trial builds the network on its device, caches the activations at the mask
point, measures its own baseline (K = 0) through that cache, and reports every K (every repeat of a random
order) to Tune as soon as it is measured, with its drop and paired interval against that baseline. A retried
or resumed trial first asks the driver's progress board which of its points are already in results.csv, and
measures only the others.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from model.convs import ConvSite
from model.zoo import Spec, build
from runner.basics import short
from runner.engine.criteria import Ranking
from runner.engine.device import compute_dtype, place, tune_allocator
from runner.engine.images import Images
from runner.engine.measure import EvalSet, Point, sweep_layer
from runner.job.board import finished
from runner.outputs.results import COLUMNS, FeatureMaps, TrialId

CRASH_ENV = "PRUNE_SWEEP_CRASH_ONCE"  # tests: "<layer>/<criterion>:<marker file>" makes that trial fail once


@dataclass(frozen=True)
class Shared:
    """Everything every trial needs, put in the object store once."""

    spec: Spec  # the network's source (model.zoo)
    state_dict: dict[str, torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_images: Images
    convs: dict[str, ConvSite]  # every conv by name
    units: dict[str, Any]  # the swept units by name: ConvSites, or Groups (unit: group)
    rankings: dict[tuple[str, str], Ranking]
    ks: dict[tuple[str, str], tuple[int, ...]]  # per trial (each measured for every order of its ranking)
    board: str  # name of the driver's ProgressBoard actor (runner.job.board: there is one only when needed)
    batch_size: int
    cache_bytes: int | None
    feature_maps: bool
    token: str  # what makes two Shared the same (checkpoint, images, batch size): see _network_and_data
    recalibration_images: Images | None = None  # adaptive BN (sweep.bn_recalibration), None = off
    stop_drop: float | None = None  # sweep.stop_drop


def point_metrics(point: Point) -> dict[str, Any]:
    """A point as Tune metrics: the results.csv columns the engine measured (the others, node, device, dtype and
    the checkpoint, are the trial's and the driver's), plus the mean feature maps as float16 arrays. A skipped
    point (stop_drop) has None for every number it did not measure."""
    metrics = {c: getattr(point, c) for c in COLUMNS if hasattr(point, c)} | recalibrated_metrics(point)
    metrics["per_class_accuracy"] = list(point.per_class_accuracy)
    metrics["skipped"] = int(point.skipped)
    metrics["maps"] = FeatureMaps({name: m.astype(np.float16) for name, m in point.maps.items()})
    if point.skipped:
        metrics |= {name: None for name in ("accuracy", "loss", "accuracy_drop", "drop_low", "drop_high",
                                            "right_to_wrong", "wrong_to_right", "eval_images")}
        metrics["per_class_accuracy"] = []
    return metrics


def recalibrated_metrics(point: Point) -> dict[str, Any]:
    """The point after adaptive BN, as results.csv's *_recalibrated columns (empty without it)."""
    r = point.recalibrated
    if r is None:
        return {}
    return {"accuracy_recalibrated": r.accuracy, "loss_recalibrated": r.loss,
            "accuracy_drop_recalibrated": point.baseline_accuracy - r.accuracy, "drop_low_recalibrated": r.drop_low,
            "drop_high_recalibrated": r.drop_high, "right_to_wrong_recalibrated": r.right_to_wrong,
            "wrong_to_right_recalibrated": r.wrong_to_right, "bn_recalibrated": r.images}


def _maybe_crash(key: str, k: int) -> None:
    """Fault injection for tests: fail once, in the middle of the named trial."""
    spec = os.environ.get(CRASH_ENV, "")
    target, _, marker = spec.partition(":")
    if target == key and marker and not os.path.exists(marker):
        open(marker, "w").close()
        if os.environ.get(CRASH_ENV + "_HARD"):
            os._exit(1)  # a process death, not an exception
        raise RuntimeError(f"injected failure in {key} at K={k}")


_READY: dict[tuple[str, str], tuple[torch.nn.Module, EvalSet, EvalSet | None]] = {}


def _network_and_data(shared: Shared, device: torch.device) -> tuple[torch.nn.Module, EvalSet, EvalSet | None]:
    """The network and the eval set on the device, built once per worker process: Tune reuses a trial's
    worker for the next trial, which then starts measuring at once (both are only read, never changed)."""
    key = (shared.token, str(device))
    if key not in _READY:
        _READY.clear()  # one sweep's worth at a time
        model = build(shared.spec, pretrained=False)
        model.load_state_dict(shared.state_dict)
        evalset = EvalSet.build(shared.eval_images, shared.mean, shared.std, shared.spec.num_classes, device,
                                shared.batch_size)
        recalibration = None if shared.recalibration_images is None else EvalSet.build(
            shared.recalibration_images, shared.mean, shared.std, shared.spec.num_classes, device, shared.batch_size)
        _READY[key] = place(model, device), evalset, recalibration
    return _READY[key]


def trial_device() -> torch.device:
    """Inside a Tune trial: the allocator tuned, torch's threads set to the trial's CPUs, and its device (the GPU
    Ray gave the trial, else the CPU)."""
    import ray
    from ray import tune

    tune_allocator()
    context = tune.get_context()
    cpus = int(context.get_trial_resources().required_resources.get("CPU", 1)) if context else 1
    torch.set_num_threads(max(1, cpus))
    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def run_trial(config: dict[str, Any], shared: Shared) -> None:
    """The Tune trainable."""
    from ray import tune
    import ray

    device = trial_device()
    layer, criterion = config["layer"], config["criterion"]
    key = TrialId(layer, criterion).key
    ranking = shared.rankings[(layer, criterion)]
    done_before = finished(shared.board, layer, criterion)
    ks = shared.ks[(layer, criterion)]
    if all((k, r) in done_before for k in ks for r in range(ranking.repeats)):
        return
    model, evalset, recalibration = _network_and_data(shared, device)
    where = {"node": short(ray.get_runtime_context().get_node_id()), "device": str(device),
             "dtype": str(compute_dtype(device)).removeprefix("torch.")}
    points = sweep_layer(model, shared.units[layer], config["target"], ranking, ks, evalset, shared.convs,
                         shared.cache_bytes, shared.feature_maps, done=done_before, recalibration=recalibration,
                         stop_drop=shared.stop_drop)
    for point in ahead(points):
        _maybe_crash(key, point.k)
        tune.report(point_metrics(point) | where)


def ahead(points: Iterator[Point]) -> Iterator[Point]:
    """The points, measured in a thread of their own while the trial reports the ones before: `tune.report`
    waits until the driver has taken the result, and the next K need not wait with it. An error in the
    measuring thread is raised here, in order."""
    done = object()
    ready: queue.Queue = queue.Queue()

    def measure() -> None:
        try:
            for point in points:
                ready.put(point)
            ready.put(done)
        except BaseException as e:  # noqa: BLE001  handed to the reporting thread
            ready.put(e)

    threading.Thread(target=measure, name="measure", daemon=True).start()
    while (item := ready.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
