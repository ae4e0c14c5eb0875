"""The layer sweep: for one (layer, criterion), every K evaluated on a cached prefix (DESIGN §7, §8).

Everything before the mask point is computed once and kept on the device (the cut of `model.graph`); each K
then runs only what comes after it, accumulating mean feature maps in the same pass. When the cache would not
fit in the memory allowed, the eval set is taken in chunks: each chunk is cached once and every K is tallied
on it, which gives the same sums as one whole pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from model.graph import ConvSite
from model.graph import Cut, trace
from model.groups import Group, savings as group_savings
from runner.engine.criteria import Ranking
from runner.engine.device import fast_math, free_memory_bytes, uses_channels_last
from runner.engine.evaluate import Tally, evaluate
from runner.engine.images import Images, to_device
from runner.engine.prune import Savings, channels_of, keep_mask, savings

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
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        x = to_device(images.images, mean, std, device, dtype, channels_last=uses_channels_last(device))
        y = torch.from_numpy(images.labels).to(device)
        return cls(list(x.split(batch_size)), list(y.split(batch_size)), num_classes)

    @property
    def count(self) -> int:
        return sum(len(y) for y in self.labels)


@dataclass(frozen=True)
class Point:
    """One measured point: layer (or group) x criterion x K."""

    layer: str
    criterion: str
    target: str
    k: int
    channels: int
    accuracy: float
    loss: float
    per_class: tuple[float, ...]
    params_removed: int
    macs_removed: int
    seconds: float
    maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # "layer", "final": mean maps
    unit: str = "layer"  # layer | group

    @property
    def fraction(self) -> float:
        return self.k / self.channels


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


_TRACED: list = []  # [(model, its graph)]: the last network traced (the graph holds the model)


def traced(model: torch.nn.Module) -> torch.fx.GraphModule:
    """The model's fx graph, traced once per model object: a worker sweeps many layers of one network."""
    if not _TRACED or _TRACED[0][0] is not model:
        _TRACED[:] = [(model, trace(model))]
    return _TRACED[0][1]


def sweep_layer(model: torch.nn.Module, conv: ConvSite, target: str, ranking: Ranking, ks: Sequence[int],
                evalset: EvalSet, convs: dict[str, ConvSite], cache_bytes: int | None = None,
                feature_maps: bool = True) -> Iterator[Point]:
    """Points for K in ascending order; each is yielded as soon as it is measured (after the last chunk when
    the cache had to be chunked)."""
    ks = sorted(ks)
    device = evalset.inputs[0].device
    split = Cut(traced(model), conv, target)
    channels = channels_of(conv, target)
    with torch.inference_mode(), fast_math(device):
        first = split.prefix(evalset.inputs[0])  # its size decides the chunking; it is kept as batch 0's cache
    budget = cache_bytes if cache_bytes is not None else default_cache_bytes(device)
    chunks = _chunks(cache_nbytes(first), len(evalset.inputs), budget)
    if len(chunks) > 1:
        log.info("%s: cache does not fit; evaluating in %d chunks", conv.name, len(chunks))
    masks = {k: keep_mask(channels, ranking.order[:k], device) for k in ks}

    def forward(cache: tuple[Tensor, ...], k: int):
        tail = split.suffix(cache, masks[k])
        return tail.logits, ({"layer": tail.layer, "final": tail.final} if feature_maps else {})

    tallies: dict[int, Tally] = {}
    seconds = dict.fromkeys(ks, 0.0)
    for chunk in chunks:
        with torch.inference_mode(), fast_math(device):
            cache = [first if i == 0 else split.prefix(evalset.inputs[i]) for i in chunk]
        first = None  # only chunk 0 holds it
        labels = [evalset.labels[i] for i in chunk]
        for k in ks:
            started = time.perf_counter()
            with fast_math(device):
                tallies[k] = evaluate(lambda c: forward(c, k), cache, labels, evalset.num_classes, tallies.get(k))
            seconds[k] += time.perf_counter() - started
            if len(chunks) == 1:
                yield _point(model, conv, target, ranking, k, channels, tallies.pop(k), seconds[k], convs)
        del cache
    for k in sorted(tallies):
        yield _point(model, conv, target, ranking, k, channels, tallies[k], seconds[k], convs)


def _point(model: torch.nn.Module, conv: ConvSite | Group, target: str, ranking: Ranking, k: int, channels: int, tally: Tally, seconds: float,
           convs: dict[str, ConvSite]) -> Point:
    started = time.perf_counter()
    result = tally.result()  # the host sync: the point's time includes finishing its device work
    if isinstance(conv, Group):
        macs, params = group_savings(model, conv, ranking.order[:k], list(convs.values()))
        saved = Savings(params, macs)
    else:
        saved = savings(conv, target, k, convs)
    return Point(unit="group" if isinstance(conv, Group) else "layer", layer=conv.name, criterion=ranking.criterion, target=target, k=k, channels=channels,
                 accuracy=result.accuracy, loss=result.loss, per_class=result.per_class,
                 params_removed=saved.params, macs_removed=saved.macs,
                 seconds=round(seconds + time.perf_counter() - started, 4), maps=result.maps)

