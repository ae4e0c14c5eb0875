"""The layer sweep: for one (layer, criterion), every K evaluated on a cached prefix (docs/design.md#the-engine).

Everything before the mask point is computed once and kept on the device (the cut, `model.cut`); the
baseline (K = 0) and then each K run only what comes after it, accumulating mean feature maps in the same pass.
The baseline goes through the same suffix, on the same device and in the same precision as the points, so a
point's drop and its paired interval (`runner.engine.paired`) compare like with like, image by image. When the
cache would not fit in the memory allowed, the eval set is taken in chunks: each chunk is cached once and every
K is tallied on it, which gives the same sums as one whole pass.

What a point saves: for the project's ResNet-18, the dead channels it leaves (`runner.engine.dead`, on the
`model.layers` listing); for other networks, the pruned conv and its consumer (`runner.engine.prune.savings`);
for a group, its members' slices (`model.groups.savings`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Collection, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from model.convs import ConvSite
from model.cut import Cut
from model.groups import Group, savings as group_savings
from model.layers import ConvInfo, list_convs as resnet_layers
from model.resnet import ResNet18
from model.savings import Savings
from model.tracing import trace
from runner.engine.adaptive_bn import Stats, estimate, norms_in, using
from runner.engine.criteria import Ranking
from runner.engine.dead import savings as dead_savings
from runner.engine.device import compute_dtype, fast_math, free_memory_bytes, uses_channels_last
from runner.engine.evaluate import Evaluation, Tally, evaluate
from runner.engine.images import Images, to_device
from runner.engine.paired import drop_interval
from runner.engine.prune import channels_of, keep_mask, savings as consumer_savings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    """Normalised eval images and labels, resident on the device, in batches."""

    inputs: list[Tensor]
    labels: list[Tensor]
    num_classes: int

    @classmethod
    def build(cls, images: Images, mean: Sequence[float], std: Sequence[float], num_classes: int,
              device: torch.device, batch_size: int) -> "EvalSet":
        x = to_device(images.images, mean, std, device, compute_dtype(device), channels_last=uses_channels_last(device))
        y = torch.from_numpy(images.labels).to(device)
        return cls(list(x.split(batch_size)), list(y.split(batch_size)), num_classes)

    @property
    def count(self) -> int:
        return sum(len(y) for y in self.labels)


@dataclass(frozen=True)
class Recalibrated:
    """A point measured after adaptive BN: its accuracy and loss, and its flips and paired interval against the
    same baseline as the plain point (the unpruned network, as trained)."""

    images: int  # the images the statistics were estimated on
    accuracy: float
    loss: float
    right_to_wrong: int
    wrong_to_right: int
    drop_low: float
    drop_high: float
    correct: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False, compare=False)  # per image


@dataclass(frozen=True)
class Point:
    """One measured point: layer (or group) x criterion x K (x repeat, for random orders), with its own baseline."""

    layer: str
    criterion: str
    target: str
    k: int
    repeat: int  # which of the ranking's orders (0 unless the criterion draws several)
    channels: int
    accuracy: float
    loss: float
    per_class_accuracy: tuple[float, ...]
    baseline_accuracy: float  # K = 0 through the same suffix, device and precision
    right_to_wrong: int  # images right at baseline and wrong at K
    wrong_to_right: int  # images wrong at baseline and right at K
    drop_low: float  # 95% paired interval on the drop, points
    drop_high: float
    eval_images: int
    params_removed: int
    macs_removed: int
    seconds: float
    maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # "layer", "final": mean maps
    unit: str = "layer"  # layer | group
    recalibrated: Recalibrated | None = None  # the point again after adaptive BN (sweep.bn_recalibration)
    skipped: bool = False  # past the stop (sweep.stop_drop): not measured; its numbers are nan

    @property
    def fraction(self) -> float:
        return self.k / self.channels

    @property
    def accuracy_drop(self) -> float:
        return self.baseline_accuracy - self.accuracy

    @property
    def lowest_low(self) -> float:
        """The lower end of the drop's interval, the lower of the two curves' when there are two."""
        return min(self.drop_low, self.recalibrated.drop_low) if self.recalibrated else self.drop_low


def default_cache_bytes(device: torch.device) -> int:
    """Memory a trial may use for cached activations when the grid says auto: a quarter of what is free."""
    return free_memory_bytes(device) // 4


def cache_nbytes(cache: tuple[Tensor, ...]) -> int:
    seen, total = set(), 0
    for t in cache:  # an identity shortcut caches the same tensor twice: count it once
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _chunks(per_batch: int, batches: int, cache_bytes: int) -> list[range]:
    """Batch index ranges whose caches fit in `cache_bytes` (one range when the whole set fits)."""
    per = max(1, cache_bytes // max(1, per_batch))
    return [range(i, min(batches, i + per)) for i in range(0, batches, per)]


BASELINE = (0, 0)  # (K, repeat) of the unpruned network


_TRACED: list = []  # [(model, its graph, its model.layers listing or None)]: the last network traced


def _traced(model: torch.nn.Module) -> tuple[torch.fx.GraphModule, dict[str, ConvInfo] | None]:
    if not _TRACED or _TRACED[0][0] is not model:
        layers = {c.name: c for c in resnet_layers(model)} if isinstance(model, ResNet18) else None
        _TRACED[:] = [(model, trace(model), layers)]
    return _TRACED[0][1], _TRACED[0][2]


def traced(model: torch.nn.Module) -> torch.fx.GraphModule:
    """The model's fx graph, traced once per model object: a worker sweeps many layers of one network."""
    return _traced(model)[0]


def sweep_layer(model: torch.nn.Module, conv: ConvSite | Group, target: str, ranking: Ranking, ks: Sequence[int],
                evalset: EvalSet, convs: dict[str, ConvSite], cache_bytes: int | None = None,
                feature_maps: bool = True, done: Collection[tuple[int, int]] = (),
                recalibration: EvalSet | None = None, stop_drop: float | None = None) -> Iterator[Point]:
    """Points for K in ascending order, each K's repeats in turn, skipping the (K, repeat) pairs in `done`; each
    is yielded as soon as it is measured (after the last chunk when the cache had to be chunked). The baseline
    is measured first, every time.

    `recalibration`: images for adaptive BN (`runner.engine.adaptive_bn`); every point is then measured a second
    time with the BatchNorm layers its mask reaches re-estimated on them (their prefix is cached too).
    `stop_drop`: once a point's drop is above it beyond doubt (the lower end of its interval, of every curve
    measured), the larger K are not measured but yielded as skipped (a cache in chunks measures every point)."""
    done = set(done)
    todo = [(k, r) for k in sorted(ks) for r in range(ranking.repeats) if (k, r) not in done]
    if not todo:
        return
    device = evalset.inputs[0].device
    split = Cut(traced(model), conv, target)
    channels = channels_of(conv, target)
    with torch.inference_mode(), fast_math(device):
        first = split.prefix(evalset.inputs[0])  # its size decides the chunking; it is kept as batch 0's cache
    budget = cache_bytes if cache_bytes is not None else default_cache_bytes(device)
    chunks = _chunks(cache_nbytes(first), len(evalset.inputs), budget)
    if len(chunks) > 1:
        log.info("%s: cache does not fit; evaluating in %d chunks", conv.name, len(chunks))
    masks = {(k, r): keep_mask(channels, ranking.orders[r][:k], device) for k, r in todo} | {BASELINE: None}
    adaptive = _Adaptive(model, split, recalibration, masks) if recalibration is not None else None

    def forward(cache: tuple[Tensor, ...], key: tuple[int, int]):
        tail = split.suffix(cache, masks[key])
        maps = {"layer": tail.layer, "final": tail.final} if feature_maps and key != BASELINE else {}
        return tail.logits, maps

    tallies: dict[tuple[int, int], Tally] = {}
    again: dict[tuple[int, int], Tally] = {}  # after adaptive BN
    seconds = dict.fromkeys(todo, 0.0)
    baseline: Evaluation | None = None
    stop: int | None = None  # the K past which nothing is measured (stop_drop)
    for chunk in chunks:
        with torch.inference_mode(), fast_math(device):
            cache = [first if i == 0 else split.prefix(evalset.inputs[i]) for i in chunk]
        first = None  # only chunk 0 holds it
        labels = [evalset.labels[i] for i in chunk]
        for key in [BASELINE, *todo]:
            if stop is not None and key[0] > stop:
                yield _skipped(model, conv, target, ranking, key, channels, baseline, evalset, convs)
                continue
            started = time.perf_counter()
            with fast_math(device):
                tallies[key] = evaluate(lambda c, key=key: forward(c, key), cache, labels, evalset.num_classes,
                                        tallies.get(key))
            if key == BASELINE:
                if len(chunks) == 1:
                    baseline = tallies.pop(BASELINE).result()
                continue
            if adaptive is not None and adaptive.norms:
                again[key] = adaptive.evaluate(key, cache, labels, evalset.num_classes, again.get(key))
            seconds[key] += time.perf_counter() - started
            if len(chunks) == 1:
                point = _point(model, conv, target, ranking, key, channels, tallies.pop(key), baseline, seconds[key],
                               convs, _again(adaptive, again.pop(key, None)))
                if stop_drop is not None and point.lowest_low > stop_drop:
                    stop = point.k
                yield point
        del cache
    if tallies:
        baseline = tallies.pop(BASELINE).result()
    for key in sorted(tallies):
        yield _point(model, conv, target, ranking, key, channels, tallies[key], baseline, seconds[key], convs,
                     _again(adaptive, again.get(key)))


class _Adaptive:
    """Adaptive BN for one cut: the BatchNorm layers its mask reaches, the recalibration images' prefix
    (cached once), and each mask's re-estimated statistics (estimated once, also when the eval set is chunked)."""

    def __init__(self, model: torch.nn.Module, split: Cut, images: EvalSet, masks: dict) -> None:
        self.model, self.split, self.masks, self.images = model, split, masks, images.count
        self.norms = norms_in(split.gm, split.downstream)
        device = images.inputs[0].device
        self.device = device
        with torch.inference_mode(), fast_math(device):
            self.cache = [split.prefix(x) for x in images.inputs] if self.norms else []
        self.stats: dict[tuple[int, int], Stats] = {}

    def stats_of(self, key: tuple[int, int]) -> Stats:
        if key not in self.stats:
            def run() -> None:
                with torch.inference_mode(), fast_math(self.device):
                    for c in self.cache:
                        self.split.suffix(c, self.masks[key])
            self.stats[key] = estimate(self.model, self.norms, run)
        return self.stats[key]

    def evaluate(self, key: tuple[int, int], cache: list, labels: list[Tensor], num_classes: int,
                 into: Tally | None) -> Tally:
        with using(self.model, self.stats_of(key)), fast_math(self.device):
            return evaluate(lambda c: self.split.suffix(c, self.masks[key]).logits, cache, labels, num_classes, into)


def _again(adaptive: _Adaptive | None, tally: Tally | None) -> tuple[int, Tally | None] | None:
    """(images, tally after adaptive BN) for `_point`: None without adaptive BN; a None tally when the mask
    reaches no BatchNorm layer (the point is its own recalibrated point)."""
    return None if adaptive is None else (adaptive.images, tally)


def _saved(model: torch.nn.Module, conv: ConvSite | Group, target: str, pruned: Sequence[int],
           num_classes: int, convs: dict[str, ConvSite]) -> Savings:
    layers = _traced(model)[1]
    if isinstance(conv, Group):
        return group_savings(model, conv, pruned, list(convs.values()))
    if layers is not None:  # the project's ResNet-18: everything the pruned channels leave dead
        return dead_savings(list(layers.values()), layers[conv.name], target, pruned, num_classes)
    return consumer_savings(conv, target, len(pruned), convs)


def _paired(baseline: Evaluation, result: Evaluation) -> tuple[int, int, float, float]:
    """Images lost and gained against the baseline, and the paired 95% interval on the drop."""
    lost = int(np.count_nonzero(baseline.correct & ~result.correct))
    gained = int(np.count_nonzero(~baseline.correct & result.correct))
    low, high = drop_interval(result.count, int(np.count_nonzero(baseline.correct)), lost, gained)
    return lost, gained, low, high


def _point(model: torch.nn.Module, conv: ConvSite | Group, target: str, ranking: Ranking, key: tuple[int, int],
           channels: int, tally: Tally, baseline: Evaluation, seconds: float, convs: dict[str, ConvSite],
           again: tuple[int, Tally | None] | None = None) -> Point:
    started = time.perf_counter()
    result = tally.result()  # the host sync: the point's time includes finishing its device work
    k, repeat = key
    saved = _saved(model, conv, target, ranking.orders[repeat][:k], len(result.per_class), convs)
    lost, gained, low, high = _paired(baseline, result)
    recalibrated = None
    if again is not None:
        images, other = again
        r = other.result() if other is not None else result
        r_lost, r_gained, r_low, r_high = _paired(baseline, r) if other is not None else (lost, gained, low, high)
        recalibrated = Recalibrated(images, r.accuracy, r.loss, r_lost, r_gained, r_low, r_high, r.correct)
    return Point(unit="group" if isinstance(conv, Group) else "layer", layer=conv.name, criterion=ranking.criterion,
                 target=target, k=k, repeat=repeat, channels=channels,
                 accuracy=result.accuracy, loss=result.loss, per_class_accuracy=result.per_class,
                 baseline_accuracy=baseline.accuracy, right_to_wrong=lost, wrong_to_right=gained, drop_low=low,
                 drop_high=high, eval_images=result.count, params_removed=saved.params, macs_removed=saved.macs,
                 seconds=round(seconds + time.perf_counter() - started, 4), maps=result.maps,
                 recalibrated=recalibrated)


def _skipped(model: torch.nn.Module, conv: ConvSite | Group, target: str, ranking: Ranking, key: tuple[int, int],
             channels: int, baseline: Evaluation, evalset: EvalSet, convs: dict[str, ConvSite]) -> Point:
    """A point past the stop (stop_drop): what it would save, and nothing measured."""
    k, repeat = key
    saved = _saved(model, conv, target, ranking.orders[repeat][:k], evalset.num_classes, convs)
    nan = float("nan")
    return Point(unit="group" if isinstance(conv, Group) else "layer", layer=conv.name, criterion=ranking.criterion,
                 target=target, k=k, repeat=repeat, channels=channels, accuracy=nan, loss=nan, per_class_accuracy=(),
                 baseline_accuracy=baseline.accuracy, right_to_wrong=0, wrong_to_right=0, drop_low=nan,
                 drop_high=nan, eval_images=0, params_removed=saved.params, macs_removed=saved.macs, seconds=0.0,
                 skipped=True)
