"""Latency of the base and the pruned model, measured in one process, one after the other.

Per batch size: both models are warmed up (`warmup` forwards each: allocator, oneDNN kernel choice), then
timed in alternation, base then pruned, one forward each per round, so that a slow spell of a shared machine
hits both alike; rounds continue until there are at least `min_runs` and `min_seconds` have passed (at most
`max_runs`). The figure is the median forward time in ms. On CUDA each forward is synchronised.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

WARMUP = 10  # forwards per model and batch size before timing
MIN_RUNS = 50  # timed forwards per model and batch size, at least
MIN_SECONDS = 2.0  # and at least this long per batch size (both models)
MAX_RUNS = 2000


@dataclass(frozen=True)
class Latency:
    batch: int
    base_ms: float  # median
    pruned_ms: float
    runs: int  # timed forwards per model

    @property
    def speedup(self) -> float:
        return self.base_ms / self.pruned_ms


def _forward_ms(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return 1000 * (time.perf_counter() - start)


def latency(base: nn.Module, pruned: nn.Module, image_shape: Sequence[int], batches: Sequence[int] = (1, 64),
            device: str = "cpu", warmup: int = WARMUP, min_runs: int = MIN_RUNS, min_seconds: float = MIN_SECONDS,
            max_runs: int = MAX_RUNS) -> list[Latency]:
    """Median forward time of `base` and `pruned` (eval mode, inference mode) at each batch size."""
    out = []
    models = [base.eval().to(device), pruned.eval().to(device)]
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in batches:
            x = torch.rand(batch, *image_shape, generator=gen).to(device)
            for model in models:
                for _ in range(warmup):
                    _forward_ms(model, x)
            times: list[list[float]] = [[], []]
            start = time.perf_counter()
            while len(times[0]) < max_runs and (len(times[0]) < min_runs or time.perf_counter() - start < min_seconds):
                for t, model in zip(times, models):
                    t.append(_forward_ms(model, x))
            out.append(Latency(batch, statistics.median(times[0]), statistics.median(times[1]), len(times[0])))
    return out
