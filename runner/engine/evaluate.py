"""The one evaluation function: accuracy, mean loss, per-class accuracy, which images were right, and mean
feature maps. No printing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Outputs = Tensor | tuple[Tensor, dict[str, Tensor]]  # logits, or logits and maps to average over images


@dataclass(frozen=True)
class Evaluation:
    accuracy: float  # percent of the evaluated images
    loss: float  # mean cross-entropy
    per_class: tuple[float, ...]  # percent per class (nan for a class with no images)
    count: int  # images evaluated
    correct: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)  # per image, in order
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # mean over images of each accumulated map


def batch_sum(x: Tensor) -> Tensor:
    """Sum over the batch dimension. A channels_last tensor is summed as the NHWC array it is: torch's
    dim-0 reduction over that layout is many times slower on the CPU."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).sum(0).permute(2, 0, 1).contiguous()
    return x.sum(0)


class Tally:
    """Running sums of one evaluation, kept on the device (no host sync until `result`)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.loss: Tensor | float = 0.0
        self.hits: Tensor | int = 0
        self.seen: Tensor | int = 0
        self.correct: list[Tensor] = []  # per batch: which images were right (paired comparisons need them)
        self.maps: dict[str, Tensor] = {}

    def add(self, logits: Tensor, labels: Tensor, maps: dict[str, Tensor] | None = None) -> None:
        logits = logits.float()
        self.loss = self.loss + F.cross_entropy(logits, labels, reduction="sum")
        hit = logits.argmax(1) == labels
        self.correct.append(hit)
        self.hits = self.hits + torch.bincount(labels[hit], minlength=self.num_classes)
        self.seen = self.seen + torch.bincount(labels, minlength=self.num_classes)
        for name, value in (maps or {}).items():
            total = batch_sum(value.float())
            self.maps[name] = self.maps[name] + total if name in self.maps else total

    def result(self) -> Evaluation:
        seen = torch.as_tensor(self.seen).cpu().double()
        hits = torch.as_tensor(self.hits).cpu().double()
        count = int(seen.sum())
        if count == 0:
            raise ValueError("nothing was evaluated")
        per_class = torch.where(seen > 0, 100 * hits / seen.clamp(min=1), torch.full_like(seen, float("nan")))
        return Evaluation(
            accuracy=float(100 * hits.sum() / count),
            loss=float(torch.as_tensor(self.loss).double().cpu()) / count,
            per_class=tuple(per_class.tolist()),
            count=count,
            correct=torch.cat(self.correct).cpu().numpy(),
            maps={k: (v / count).cpu().numpy() for k, v in self.maps.items()},
        )


def evaluate(forward: Callable[[Any], Outputs], inputs: Iterable[Any], labels: Iterable[Tensor], num_classes: int,
             into: Tally | None = None) -> Tally:
    """Run `forward` on every batch of `inputs` (tensors, or cached tuples) and tally against `labels`.

    `into` continues an earlier tally (an evaluation done in chunks gives the same sums as one done whole).
    """
    tally = into if into is not None else Tally(num_classes)
    with torch.inference_mode():
        for x, y in zip(inputs, labels, strict=True):
            out = forward(x)
            logits, maps = (out, None) if isinstance(out, Tensor) else out
            tally.add(logits, y, maps)
    return tally
