"""Side-by-side timings of the ways to measure one layer sweep (docs/benchmarks.md).

(a) the seed's loop: per point reload the weights, rank on the calibration images, zero weights, full eval;
(b) the usual tool's loop (Distiller / NNI style): rank once per layer; per point zero weights, full eval,
    restore the weights;
(c) this engine: every ranking in one calibration pass; per layer a cached prefix, per point the suffix with
    accounting and feature maps;
(d) the floor: the same cached prefix and suffix forward passes and nothing else.
All four run in one process on the same checkpoint, data, layers, K values and criterion; (a), (b) and (c)
must give identical accuracies at every point.

`--adaptive-bn N`: what adaptive BN (sweep.bn_recalibration: N) adds to the engine's time on the same layers and
K values: every point measured plain, then plain and again after re-estimating the reached BatchNorm statistics on
N calibration images. `--stop-drop D`: the engine with and without sweep.stop_drop: D, and the points it skipped.

`--resnet50`: the same question on a network that is not ours: torchvision's resnet50 (random init, 10 classes,
64x64 random images labelled by the unpruned network's own predictions), one conv per stage x K = 1/4 and 1/2
of its channels, measured (cached) by the engine's `sweep_layer` (prefix once per layer, suffix per K) and
(full) by a whole masked forward per point through `evaluate`; both must give identical accuracies.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from model.convs import ConvSite, list_convs
from model.cut import Cut
from runner.cli import Parser, run_main
from runner.config import Grid, load_grid
from runner.engine.criteria import Ranking, rank_all
from runner.engine.device import fast_math, host_available_bytes, pick_device, place
from runner.engine.evaluate import evaluate
from runner.engine.images import Images
from runner.engine.measure import EvalSet, cache_nbytes, sweep_layer, traced
from runner.engine.prune import keep_mask, masked, zero_weights
from runner.errors import EXIT_FAILED
from runner.inputs import checkpoints
from runner.inputs.models import spec_of
from runner.inputs.data import Dataset, load_data
from runner.inputs.train import ensure_checkpoint
from runner.inputs.trials import plan_trials, select_layers
from runner.job.calibration import rank_trials
from runner.outputs.results import read_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the seed's loop lives with the tests
from seed_loop import seed_loop as reference_loop

log = logging.getLogger(__name__)

FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)  # 8 K values per layer
R50_LAYERS = ("layer1.0.conv2", "layer2.1.conv2", "layer3.2.conv2", "layer4.1.conv2")  # --resnet50: one per stage
R50_FRACTIONS = (0.25, 0.5)
R50_SIZE, R50_BATCH, R50_CLASSES, R50_IMAGES = 64, 64, 10, 256


@dataclass
class Setup:
    grid: Grid
    data: Dataset
    path: str
    device: torch.device
    convs: dict[str, ConvSite]
    layers: list[ConvSite]
    ks: dict[str, list[int]]
    criterion: str
    evalset: EvalSet
    calibration: EvalSet
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Timing:
    name: str
    seconds: float = 0.0
    peak_bytes: int = 0
    accuracies: dict[tuple[str, int], float] = field(default_factory=dict)
    point_seconds: float = 0.0  # --resnet50's cached side: its per-K suffix passes alone (sum of Point.seconds)


class _PeakMemory:
    """Peak memory of the block: CUDA's allocator peak above what was allocated before it, or on the CPU the
    process's resident size sampled every 5 ms (absolute: freed buffers stay in the process, see
    runner.device.tune_allocator, so a difference would read as zero)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            yield
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - base
            return
        self.peak = self._rss()
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()


def prepare(grid_path: str, overrides: list[str], criterion: str, eval_size: int, calibration_size: int,
            layers: str | list[str], device: str) -> Setup:
    grid = load_grid(grid_path, overrides + [f"data.eval_size={eval_size}",
                                             f"data.calibration_size={calibration_size}"])
    data = load_data(grid.data, grid.model.num_classes, grid.seed)
    loaded = ensure_checkpoint(grid, data)
    dev = pick_device(device)
    convs = plan_trials(grid).table
    chosen = select_layers(list(convs.values()), layers, include_shortcuts=False)
    ks = {c.name: sorted({max(1, round(f * c.out_channels)) for f in FRACTIONS}) for c in chosen}
    mean, std = loaded.normalisation
    bs = grid.sweep.batch_size
    return Setup(grid, data, grid.checkpoint.path, dev, convs, chosen, ks, criterion,
                 EvalSet.build(data.test, mean, std, len(data.classes), dev, bs),
                 EvalSet.build(data.calibration, mean, std, len(data.classes), dev, bs), mean, std)


def _fresh_model(s: Setup) -> torch.nn.Module:
    """The network as read from the checkpoint file (what 'reload the weights' means)."""
    return place(checkpoints.load_spec(s.path, spec_of(s.grid.model)).model, s.device)


def _rank_one(s: Setup, model: torch.nn.Module, conv: ConvSite) -> tuple[int, ...]:
    cal = s.calibration
    with fast_math(s.device):
        r = rank_all(model, [conv], [s.criterion], "output", torch.cat(cal.inputs), torch.cat(cal.labels),
                     s.grid.sweep.batch_size, s.grid.sweep.random_seed)
    return r[(conv.name, s.criterion)].order


def _full_eval(s: Setup, model: torch.nn.Module) -> float:
    with fast_math(s.device):
        return evaluate(model, s.evalset.inputs, s.evalset.labels, s.evalset.num_classes).result().accuracy


def seed_loop(s: Setup) -> Timing:
    t = Timing("a: seed loop")
    for conv in s.layers:  # per point: reload, rank, zero, evaluate everything
        ks = s.ks[conv.name]
        accuracies = reference_loop(lambda: _fresh_model(s), conv, "output", ks, lambda m, c=conv: _rank_one(s, m, c),
                                    lambda m: _full_eval(s, m))
        t.accuracies.update({(conv.name, k): a for k, a in zip(ks, accuracies)})
    return t


def usual_loop(s: Setup) -> Timing:
    t = Timing("b: usual tool")
    model = _fresh_model(s)
    modules = dict(model.named_modules())
    for conv in s.layers:
        order = _rank_one(s, model, conv)  # once per layer
        saved = {n: modules[n].weight.detach().clone() for n in (conv.name, conv.bn)}
        saved_bias = modules[conv.bn].bias.detach().clone()
        for k in s.ks[conv.name]:
            zero_weights(model, conv, "output", order[:k])
            t.accuracies[(conv.name, k)] = _full_eval(s, model)
            with torch.no_grad():  # restore
                for n, w in saved.items():
                    modules[n].weight.copy_(w)
                modules[conv.bn].bias.copy_(saved_bias)
    return t


def engine(s: Setup) -> Timing:
    t = Timing("c: this engine")
    model = _fresh_model(s)
    cal = s.calibration
    with fast_math(s.device):
        rankings = rank_all(model, s.layers, [s.criterion], "output", torch.cat(cal.inputs), torch.cat(cal.labels),
                            s.grid.sweep.batch_size, s.grid.sweep.random_seed)
    for conv in s.layers:
        for p in sweep_layer(model, conv, "output", rankings[(conv.name, s.criterion)], s.ks[conv.name],
                             s.evalset, s.convs):
            t.accuracies[(conv.name, p.k)] = p.accuracy
    return t


def floor(s: Setup, orders: dict[str, tuple[int, ...]]) -> Timing:
    t = Timing("d: floor")
    model = _fresh_model(s)
    for conv in s.layers:
        split = Cut(traced(model), conv, "output")
        with torch.inference_mode(), fast_math(s.device):
            cache = [split.prefix(x) for x in s.evalset.inputs]
            for k in s.ks[conv.name]:
                mask = keep_mask(conv.out_channels, orders[conv.name][:k], s.device)
                for c in cache:
                    split.suffix(c, mask)
    if s.device.type == "cuda":
        torch.cuda.synchronize()
    return t


def _timed(device: torch.device, fn: Callable[[], Timing]) -> Timing:
    peak = _PeakMemory(device)
    started = time.perf_counter()
    with peak.measure():
        t = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    t.seconds, t.peak_bytes = time.perf_counter() - started, peak.peak
    log.info("%s: %.1f s", t.name, t.seconds)
    return t


def run_bench(s: Setup, skip_seed: bool = False) -> dict[str, Any]:
    """All four timings, the accuracy check, and the ratios."""
    points = sum(len(v) for v in s.ks.values())
    log.info("bench: %d layers, %d points, criterion %s, %d eval and %d calibration images on %s", len(s.layers),
             points, s.criterion, s.evalset.count, s.calibration.count, s.device)
    _full_eval(s, _fresh_model(s))  # warm-up: the first pass pays one-off kernel set-up costs
    orders = {}
    warm = _fresh_model(s)
    for conv in s.layers:
        orders[conv.name] = _rank_one(s, warm, conv)
    c = _timed(s.device, lambda: engine(s))
    d = _timed(s.device, lambda: floor(s, orders))
    b = _timed(s.device, lambda: usual_loop(s))
    a = None if skip_seed else _timed(s.device, lambda: seed_loop(s))
    mismatches = [(key, v, c.accuracies.get(key)) for t in (x for x in (a, b) if x) for key, v in t.accuracies.items()
                  if v != c.accuracies.get(key)]
    timings = [x for x in (a, b, c, d) if x]
    cache_bytes, cache_layer = _largest_cache(s)
    return {
        "largest_cache_bytes": cache_bytes, "largest_cache_layer": cache_layer,
        "device": str(s.device), "layers": [x.name for x in s.layers], "points": points, "criterion": s.criterion,
        "eval_images": s.evalset.count, "calibration_images": s.calibration.count,
        "width": s.grid.model.width, "dataset": s.data.name,
        "timings": {t.name: {"seconds": round(t.seconds, 3), "peak_bytes": t.peak_bytes,
                             "seconds_per_point": round(t.seconds / points, 4)} for t in timings},
        "ratios": {**({"a/c": a.seconds / c.seconds} if a else {}), "b/c": b.seconds / c.seconds,
                   "c/d": c.seconds / d.seconds},
        "identical_accuracies": not mismatches, "mismatches": [list(map(str, m)) for m in mismatches[:10]],
        "host_available_bytes": host_available_bytes(),
    }


def engine_pass(s: Setup, recalibration: EvalSet | None = None, stop_drop: float | None = None) -> Timing:
    """The engine over every layer and K (one ranking pass first), as a sweep's trials run it."""
    t = Timing("engine" + (f" + adaptive BN ({recalibration.count})" if recalibration else "")
               + (f" + stop_drop {stop_drop:g}" if stop_drop is not None else ""))
    model = _fresh_model(s)
    cal = s.calibration
    with fast_math(s.device):
        rankings = rank_all(model, s.layers, [s.criterion], "output", torch.cat(cal.inputs), torch.cat(cal.labels),
                            s.grid.sweep.batch_size, s.grid.sweep.random_seed)
    for conv in s.layers:
        for p in sweep_layer(model, conv, "output", rankings[(conv.name, s.criterion)], s.ks[conv.name],
                             s.evalset, s.convs, feature_maps=True, recalibration=recalibration, stop_drop=stop_drop):
            t.accuracies[(conv.name, p.k)] = p.accuracy
    return t


def run_variant(s: Setup, adaptive_bn: int = 0, stop_drop: float | None = None, repeat: int = 2) -> dict[str, Any]:
    """The engine alone against the engine with adaptive BN or with stop_drop, alternated `repeat` times; the
    fastest of each, and what the second one adds (or saves)."""
    recalibration = None
    if adaptive_bn:
        mean, std = s.mean, s.std
        recalibration = EvalSet.build(s.data.calibration.take(slice(adaptive_bn)), mean, std, len(s.data.classes),
                                      s.device, s.grid.sweep.batch_size)
    _full_eval(s, _fresh_model(s))  # warm-up
    plain, other = [], []
    for _ in range(repeat):
        plain.append(_timed(s.device, lambda: engine_pass(s)))
        other.append(_timed(s.device, lambda: engine_pass(s, recalibration, stop_drop)))
    a, b = min(plain, key=lambda t: t.seconds), min(other, key=lambda t: t.seconds)
    points = sum(len(v) for v in s.ks.values())
    skipped = sum(1 for v in b.accuracies.values() if v != v)
    same = all(b.accuracies[key] == v for key, v in a.accuracies.items() if b.accuracies[key] == b.accuracies[key])
    return {"device": str(s.device), "points": points, "layers": len(s.layers), "eval_images": s.evalset.count,
            "criterion": s.criterion, "plain_seconds": round(a.seconds, 2), "variant": b.name,
            "variant_seconds": round(b.seconds, 2), "added_fraction": round(b.seconds / a.seconds - 1, 3),
            "skipped_points": skipped, "identical_accuracies": same,
            "all_seconds": {"plain": [round(t.seconds, 2) for t in plain], "variant": [round(t.seconds, 2) for t in other]}}


def variant_line(r: dict[str, Any]) -> str:
    change = f"adds {100 * r['added_fraction']:.0f}%" if r["added_fraction"] >= 0 else \
        f"saves {-100 * r['added_fraction']:.0f}%"
    return (f"{r['variant']}: {r['variant_seconds']:.2f} s against {r['plain_seconds']:.2f} s for the engine alone "
            f"({change}); {r['points']} points on {r['layers']} layers, {r['eval_images']} eval images, "
            f"{r['criterion']}, {r['device']}; {r['skipped_points']} points skipped; plain accuracies "
            f"{'identical' if r['identical_accuracies'] else 'DIFFER'} at every point measured; runs "
            f"{r['all_seconds']}")


def _largest_cache(s: Setup) -> tuple[int, str]:
    """The biggest prefix cache the engine holds for one layer (its extra memory over a full-network eval)."""
    model = _fresh_model(s)
    sizes = {}
    with torch.inference_mode(), fast_math(s.device):
        for conv in s.layers:
            first = Cut(traced(model), conv, "output").prefix(s.evalset.inputs[0])
            sizes[conv.name] = cache_nbytes(first) * s.evalset.count // len(s.evalset.labels[0])
    layer = max(sizes, key=sizes.get)
    return sizes[layer], layer


def table(result: dict[str, Any]) -> list[str]:
    peak = "peak MiB" if result["device"].startswith("cuda") else "peak RSS MiB"
    lines = [f"{'method':<16} {'seconds':>9} {'s/point':>9} {peak:>12}"]
    for name, t in result["timings"].items():
        lines.append(f"{name:<16} {t['seconds']:>9.2f} {t['seconds_per_point']:>9.4f} "
                     f"{t['peak_bytes'] / 2**20:>12.1f}")
    lines.append(f"engine's largest activation cache: {result['largest_cache_bytes'] / 2**20:.1f} MiB "
                 f"({result['largest_cache_layer']}); peak memory is the whole process's")
    lines.append(f"points {result['points']} ({len(result['layers'])} layers), {result['eval_images']} eval / "
                 f"{result['calibration_images']} calibration images, {result['device']}; accuracies of a, b, c "
                 f"{'identical at every point' if result['identical_accuracies'] else 'DIFFER: ' + str(result['mismatches'])}")
    return lines + [f"{k} {v:.2f}" for k, v in result["ratios"].items()]


# --- --resnet50: cached suffix against full masked forwards on torchvision's resnet50 ---------------------------

@dataclass
class R50Setup:
    model: torch.nn.Module
    device: torch.device
    convs: dict[str, ConvSite]
    layers: list[ConvSite]
    ks: dict[str, list[int]]
    orders: dict[str, tuple[int, ...]]
    rankings: dict[tuple[str, str], Ranking]
    criterion: str
    evalset: EvalSet


def _settle_bn(model: torch.nn.Module, images: torch.Tensor) -> None:
    """BN running statistics set to those of one train-mode forward of `images` (momentum None for that pass:
    the cumulative average of one batch is the batch's own statistics), so that every channel carries signal
    and pruning any of them changes the outputs."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()


def prepare_resnet50(images: int, layers: list[str], criterion: str, device: str,
                     fractions: tuple[float, ...] = R50_FRACTIONS, seed: int = 0) -> R50Setup:
    """torchvision's resnet50 with random weights and settled BN, `images` random 64x64 images labelled by the
    unpruned network's predictions (baseline accuracy 100%), the chosen convs, their K values and rankings.
    The network is traced here, outside the timings (a worker traces its network once)."""
    from torchvision.models import resnet50

    torch.manual_seed(seed)
    model = resnet50(num_classes=R50_CLASSES)
    _settle_bn(model, torch.randn(R50_BATCH, 3, R50_SIZE, R50_SIZE, generator=torch.Generator().manual_seed(seed)))
    sites = list_convs(model, R50_SIZE)
    chosen = select_layers(sites, layers, include_shortcuts=False)
    dev = pick_device(device)
    model = place(model, dev)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (images, R50_SIZE, R50_SIZE, 3), dtype=np.uint8)
    unlabelled = EvalSet.build(Images(pixels, np.zeros(images, np.int64)), (0.5,) * 3, (0.25,) * 3, R50_CLASSES,
                               dev, R50_BATCH)
    with torch.inference_mode(), fast_math(dev):
        labels = [model(x).argmax(1) for x in unlabelled.inputs]
    evalset = EvalSet(unlabelled.inputs, labels, R50_CLASSES)
    ks = {c.name: sorted({max(1, round(f * c.out_channels)) for f in fractions}) for c in chosen}
    with fast_math(dev):
        rankings = rank_all(model, chosen, [criterion], "output", torch.cat(evalset.inputs), torch.cat(labels),
                            R50_BATCH, seed)
    traced(model)
    return R50Setup(model, dev, {c.name: c for c in sites}, chosen, ks,
                    {c.name: rankings[(c.name, criterion)].order for c in chosen}, rankings, criterion, evalset)


def r50_cached(s: R50Setup, conv: ConvSite) -> Timing:
    """The engine on one conv: one cached prefix, its baseline and one suffix pass per K (no feature maps: the
    same forward work as the full side plus the prefix and the baseline). `point_seconds`: the K passes alone."""
    t = Timing(f"cached {conv.name}")
    for p in sweep_layer(s.model, conv, "output", s.rankings[(conv.name, s.criterion)], s.ks[conv.name], s.evalset,
                         s.convs, feature_maps=False):
        t.accuracies[(conv.name, p.k)] = p.accuracy
        t.point_seconds += p.seconds
    return t


def r50_full(s: R50Setup, conv: ConvSite) -> Timing:
    """Per point of one conv, the whole network's forward with the same channels masked, through `evaluate`."""
    t = Timing(f"full {conv.name}")
    ev = s.evalset
    for k in s.ks[conv.name]:
        with masked(s.model, conv, "output", s.orders[conv.name][:k]), fast_math(s.device):
            t.accuracies[(conv.name, k)] = evaluate(s.model, ev.inputs, ev.labels, ev.num_classes).result().accuracy
    return t


def run_resnet50(s: R50Setup, repeat: int = 3) -> dict[str, Any]:
    """Both timings, in one process on the same network, images, convs, K values and orders, and the check on
    every run. The two sides alternate conv by conv, `repeat` times; a side's time is the sum over convs of its
    fastest run: on a shared machine another process's load only ever adds time (2 cores: one 8-point run took
    4.4 s, the next 53.8 s), and alternating per conv gives a passing load to both sides alike."""
    points = sum(len(v) for v in s.ks.values())
    log.info("resnet50: %d convs, %d points, criterion %s, %d images of %dx%d on %s (%d threads), %d runs each",
             len(s.layers), points, s.criterion, s.evalset.count, R50_SIZE, R50_SIZE, s.device,
             torch.get_num_threads(), repeat)
    ev = s.evalset
    with fast_math(s.device):  # warm-up: the first pass pays one-off kernel set-up costs
        baseline = evaluate(s.model, ev.inputs, ev.labels, ev.num_classes).result().accuracy
    runs: dict[str, dict[str, list[Timing]]] = {"cached": {}, "full": {}}
    for _ in range(max(1, repeat)):
        for conv in s.layers:
            for side, fn in (("cached", r50_cached), ("full", r50_full)):
                runs[side].setdefault(conv.name, []).append(_timed(s.device, lambda fn=fn, conv=conv: fn(s, conv)))
    mismatches: list[tuple[Any, ...]] = []
    for conv in s.layers:
        for c, f in zip(runs["cached"][conv.name], runs["full"][conv.name]):
            want = [(conv.name, k) for k in s.ks[conv.name]]
            mismatches += [(key, f.accuracies.get(key), c.accuracies.get(key)) for key in want
                           if key not in f.accuracies or f.accuracies.get(key) != c.accuracies.get(key)]
    if mismatches:
        log.error("resnet50: cached and full accuracies differ (point, full, cached): %s", mismatches[:10])
    best = {side: {layer: min(ts, key=lambda t: t.seconds) for layer, ts in per.items()} for side, per in runs.items()}
    seconds = {side: sum(t.seconds for t in b.values()) for side, b in best.items()}
    first = {side: {key: a for ts in per.values() for key, a in ts[0].accuracies.items()} for side, per in runs.items()}
    return {
        "model": "torchvision resnet50", "image_size": R50_SIZE, "images": ev.count, "batch_size": R50_BATCH,
        "device": str(s.device), "threads": torch.get_num_threads(), "criterion": s.criterion,
        "layers": [x.name for x in s.layers], "ks": s.ks, "points": points, "baseline_accuracy": baseline,
        "repeat": max(1, repeat),
        "timings": {side: {"seconds": round(seconds[side], 3), "seconds_per_point": round(seconds[side] / points, 4),
                           "runs": {layer: [round(t.seconds, 3) for t in ts] for layer, ts in runs[side].items()},
                           "peak_bytes": max(t.peak_bytes for ts in runs[side].values() for t in ts)}
                    for side in runs},
        "cached_k_passes_seconds": round(sum(t.point_seconds for t in best["cached"].values()), 3),
        "full/cached": seconds["full"] / seconds["cached"],
        "accuracies": [{"layer": layer, "k": k, "full": a, "cached": first["cached"].get((layer, k))}
                       for (layer, k), a in first["full"].items()],
        "identical_accuracies": not mismatches,
        "mismatches": [list(map(str, m)) for m in mismatches[:10]],
    }


def resnet50_lines(result: dict[str, Any]) -> list[str]:
    """--resnet50's printed result: the timing line, how it was taken, and the check with every accuracy."""
    t = result["timings"]
    ks = {len(v) for v in result["ks"].values()}
    per = f" x {ks.pop()} K" if len(ks) == 1 else ""
    check = ("accuracies identical at every point" if result["identical_accuracies"]
             else f"accuracies DIFFER: {result['mismatches']}")
    points = ", ".join(f"{a['layer']} K={a['k']} {a['full']:.1f}" for a in result["accuracies"])
    size = f"{result['image_size']}x{result['image_size']}"
    line = (f"torchvision resnet50 {size}: {result['points']} points ({len(result['layers'])} convs{per}), "
            f"{result['images']} images, {result['device']}: cached {t['cached']['seconds']:.1f} s, "
            f"full {t['full']['seconds']:.1f} s, full/cached {result['full/cached']:.1f}")
    detail = (f"per conv the best of {result['repeat']} runs, the sides alternated conv by conv; cached = per conv "
              f"a prefix, a baseline and the K suffixes (these alone {result['cached_k_passes_seconds']:.1f} s)")
    return [line, detail, f"{check}; accuracy % (baseline {result['baseline_accuracy']:.1f}): {points}"]


def engine_alone(grid_path: str, overrides: list[str]) -> int:
    """The grid's points computed by the engine alone, in this process: data, checkpoint, one calibration pass,
    then every trial's layer sweep with its own baseline (no Ray, no W&B, nothing written). Returns the points."""
    grid = load_grid(grid_path, overrides)
    loaded = checkpoints.existing(grid)
    # loaded as the sweep loads it: the training images only when the checkpoint is to be trained
    data = load_data(grid.data, grid.model.num_classes, grid.seed, training=loaded is None)
    loaded = ensure_checkpoint(grid, data, loaded)
    plan = plan_trials(grid)
    rankings = rank_trials(grid, plan, data, loaded)
    device = pick_device()
    model = place(loaded.model, device)
    evalset = EvalSet.build(data.test, *loaded.normalisation, len(data.classes), device, grid.sweep.batch_size)
    points = 0
    for t in plan.trials:
        points += len(list(sweep_layer(model, plan.table[t.layer], t.target, rankings[(t.layer, t.criterion)],
                                       t.ks, evalset, plan.table)))
    return points


def end_to_end(grid_path: str, overrides: list[str], workdir: Path, repeat: int = 2) -> dict[str, Any]:
    """Wall time of the whole `scripts/sweep.py` run (Ray Tune, W&B offline, results, report) against the
    engine alone on the same grid, each as a fresh command (interpreter start and imports included in both),
    alternated `repeat` times; the ratio is of the totals (this machine's speed drifts by 5-10% over minutes,
    so one pair alone is noisy)."""
    grid = load_grid(grid_path, overrides)
    ensure_checkpoint(grid, load_data(grid.data, grid.model.num_classes, grid.seed))  # trained outside the timings
    scripts = Path(__file__).resolve().parent
    sets = sum((["--set", o] for o in overrides), [])
    plan = plan_trials(grid)
    engine, sweep, timelines = [], [], []
    for i in range(repeat):
        engine.append(_wall([sys.executable, str(scripts / "bench.py"), "--engine-alone", "--grid", grid_path,
                             *sets])[0])
        out = workdir / f"run{i}"
        seconds, stderr, spawned, exited = _wall([sys.executable, str(scripts / "sweep.py"), "--grid", grid_path,
                                                  "--output", str(out), "--wandb-mode", "offline", "-v", *sets])
        sweep.append(seconds)
        timelines.append(_timeline(stderr, spawned, exited))
        rows = read_rows(out / grid.name / "results.csv")
        if len(rows) != plan.points:
            raise RuntimeError(f"the sweep wrote {len(rows)} of {plan.points} points")
        log.info("pair %d: engine alone %.1f s, sweep %.1f s (fixed part %.1f s: %s)", i + 1, engine[-1], sweep[-1],
                 timelines[-1]["fixed"], timelines[-1]["phases"])
    return {"points": plan.points, "trials": len(plan.trials), "engine_seconds": [round(x, 2) for x in engine],
            "sweep_seconds": [round(x, 2) for x in sweep], "e2e": sum(sweep) / sum(engine),
            "timelines": timelines}


def _timeline(stderr: str, spawned: float, exited: float) -> dict[str, Any]:
    """The sweep's phases (its `timeline {...}` log line at -v), and its fixed part as the command saw it:
    from starting the command to the first point, plus from the last point to the command's exit."""
    line = next(x for x in stderr.splitlines()[::-1] if " timeline {" in x)
    t = json.loads(line.split(" timeline ", 1)[1])
    fixed = (t["first_point"] - spawned) + (exited - t["last_point"]) if t["first_point"] else None
    return {"phases": t["phases"], "fixed": round(fixed, 2) if fixed is not None else None,
            "to_first_point": round(t["first_point"] - spawned, 2), "after_last_point": round(exited - t["last_point"], 2)}


def _wall(command: list[str]) -> tuple[float, str, float, float]:
    """Seconds a command took, its stderr, and the wall-clock times it was started and ended."""
    spawned, started = time.time(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds, exited = time.perf_counter() - started, time.time()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:3])} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stderr, spawned, exited


def latency_check(grid_path: str, overrides: list[str]) -> dict[str, Any]:
    """`--latency`: what the prune job's latency table cost (latency/cost.json: its time, per unit x K entry,
    and its fraction of the job), then, for an onnxruntime target, every latency plan's pruned.onnx timed by
    onnxruntime alone in a separate process (scripts/onnx_latency.py), in alternation with the base model
    exported from the checkpoint: its kept fraction against the budget (x 1.05), the job's latency_kept, and
    the table's prediction against the job's measurement (kept fractions: each of its own rounds' base)."""
    import pandas as pd

    from runner.planning.export import export_onnx

    grid = load_grid(grid_path, overrides)
    folder, target = grid.folder, grid.plan.target
    cost = json.loads((folder / "latency" / "cost.json").read_text(encoding="utf-8"))
    result: dict[str, Any] = {"cost": cost, "plans": {}}
    print(f"latency table on {cost['target']}: {cost['entries']} entries; this job measured {cost['measured']} in "
          f"{cost['table_seconds']:.1f} s ({cost['per_entry_seconds']:.2f} s per entry over all entries' own "
          f"times, {cost['entry_seconds']:.1f} s), {cost['table_seconds'] / cost['job_seconds']:.1%} of the prune "
          f"job's {cost['job_seconds']:.1f} s")
    plans = pd.read_csv(folder / "plans.csv")
    if target is None or target.runtime != "onnxruntime":
        return result
    loaded = checkpoints.load_for(grid)
    size = grid.data.image_size or 32
    base = folder / "latency" / "base.onnx"
    export_onnx(base, loaded.model.cpu().eval(), *loaded.normalisation, size)
    timed = plans[plans["budget"].str.startswith("latency")]
    files = [str(Path(f) / "pruned.onnx") for f in timed["folder"]]
    command = [sys.executable, str(Path(__file__).with_name("onnx_latency.py")), str(base), *files, "--batch",
               str(target.batch), "--image-size", str(size), "--clock", target.clock]
    if target.threads:
        command += ["--threads", str(target.threads)]
    alone = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    for row, f in zip(timed.to_dict("records"), files):
        a = alone["files"][f]
        keep = float(row["budget"][len("latency"):])
        check = {"budget": keep, "alone_kept": a["kept"], "alone_ms": a["ms"], "alone_low": a["low"],
                 "alone_high": a["high"], "alone_base_ms": a["base_ms"], "job_kept": row["latency_kept"],
                 "job_ms": row["latency_ms"], "predicted_ms": row["latency_predicted_ms"],
                 "predicted_kept": row["latency_predicted_kept"],
                 "meets": a["kept"] <= keep * 1.05, "job_vs_alone": row["latency_kept"] / a["kept"] - 1,
                 "prediction_error": row["latency_predicted_kept"] / row["latency_kept"] - 1,
                 "macs_kept": row["macs_kept"]}
        result["plans"][f"{row['budget']}-{row['method']}"] = check
        print(f"{row['budget']}-{row['method']}: onnxruntime alone {a['ms']:.2f} ms [{a['low']:.2f}, {a['high']:.2f}]"
              f" vs base {a['base_ms']:.2f} ms = {a['kept']:.3f} kept (budget {keep:g} x 1.05 = {keep * 1.05:.3f}: "
              f"{'meets' if check['meets'] else 'MISSES'}); job's latency_kept {row['latency_kept']:.3f} "
              f"({check['job_vs_alone']:+.1%}); table predicted {row['latency_predicted_kept']:.3f} kept vs the "
              f"job's {row['latency_kept']:.3f} ({check['prediction_error']:+.1%}); MACs kept {row['macs_kept']:.3f}")
    return result


def write_json(path: str, result: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(result, indent=2), encoding="utf-8")


def main() -> int:
    p = Parser(description=__doc__)
    p.add_argument("--grid", default="sweeps/demo.yaml", help="grid whose model, data and checkpoint to use")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one grid key")
    p.add_argument("--criterion", default=None, help="default mean_activation; --resnet50: l1_norm")
    p.add_argument("--layers", nargs="+", default=None, help="layer names or patterns (default: all 17 main-path; "
                   f"--resnet50: {' '.join(R50_LAYERS)})")
    p.add_argument("--eval-size", type=int, default=None,
                   help=f"eval images (default 1000; --resnet50: {R50_IMAGES}, in batches of {R50_BATCH})")
    p.add_argument("--calibration-size", type=int, default=1000, help="calibration images")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--skip-seed", action="store_true", help="leave out (a), the slowest")
    p.add_argument("--end-to-end", action="store_true", help="time the whole sweep.py run against the engine alone")
    p.add_argument("--resnet50", action="store_true", help="torchvision resnet50 at 64x64, random weights: the "
                   "engine's cached suffix against full masked forwards, same points (CPU unless --device)")
    p.add_argument("--fractions", type=float, nargs="+", default=list(R50_FRACTIONS),
                   help="--resnet50: K values per conv, as fractions of its channels")
    p.add_argument("--repeat", type=int, default=None,
                   help="--end-to-end, --adaptive-bn, --stop-drop: alternated pairs of runs (default 2); --resnet50: "
                   "runs per conv (default 3)")
    p.add_argument("--latency", action="store_true", help="the prune job's latency table cost, and its latency "
                   "plans' pruned.onnx timed by onnxruntime alone in a separate process (after prune-sweep prune)")
    p.add_argument("--engine-alone", action="store_true", help=argparse.SUPPRESS)  # the timed half of --end-to-end
    p.add_argument("--adaptive-bn", type=int, default=0, metavar="N",
                   help="time the engine with adaptive BN on N calibration images against the engine alone")
    p.add_argument("--stop-drop", type=float, default=None, metavar="D",
                   help="time the engine with sweep.stop_drop D against the engine alone")
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args()
    if args.engine_alone:
        print(f"{engine_alone(args.grid, args.set)} points")
        return 0
    if args.latency:
        result = latency_check(args.grid, args.set)
    elif args.resnet50:
        images = R50_IMAGES if args.eval_size is None else args.eval_size
        r50 = prepare_resnet50(images, args.layers or list(R50_LAYERS), args.criterion or "l1_norm",
                               "cpu" if args.device == "auto" else args.device, tuple(args.fractions))
        result = run_resnet50(r50, 3 if args.repeat is None else args.repeat)
        print("\n".join(resnet50_lines(result)))
    elif args.adaptive_bn or args.stop_drop is not None:
        setup = prepare(args.grid, args.set, args.criterion or "l1_norm",
                        1000 if args.eval_size is None else args.eval_size, args.calibration_size,
                        args.layers or "all", args.device)
        result = run_variant(setup, args.adaptive_bn, args.stop_drop, 2 if args.repeat is None else args.repeat)
        print(variant_line(result))
    elif args.end_to_end:
        with tempfile.TemporaryDirectory() as work:
            result = end_to_end(args.grid, args.set, Path(work), 2 if args.repeat is None else args.repeat)
        print(f"sweep.py {' + '.join(map(str, result['sweep_seconds']))} s, engine alone "
              f"{' + '.join(map(str, result['engine_seconds']))} s, {result['points']} points in {result['trials']} "
              "trials")
        for i, t in enumerate(result["timelines"], 1):
            print(f"sweep {i}: to the first point {t['to_first_point']} s, after the last {t['after_last_point']} s "
                  f"(fixed {t['fixed']} s); phases " + ", ".join(f"{k} {v}" for k, v in t["phases"].items()))
        print(f"e2e {result['e2e']:.2f}")
    else:
        setup = prepare(args.grid, args.set, args.criterion or "mean_activation",
                        1000 if args.eval_size is None else args.eval_size, args.calibration_size,
                        args.layers or "all", args.device)
        result = run_bench(setup, skip_seed=args.skip_seed)
        print("\n".join(table(result)))
    if args.json:
        write_json(args.json, result)
    return 0 if result.get("identical_accuracies", True) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(run_main(main))
