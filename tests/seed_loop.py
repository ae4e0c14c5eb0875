"""The seed's loop: the reference the engine is checked and timed against (tests, scripts/bench.py).

Per K it does what the origin experiment did: reload the weights, rank the channels, zero them in the
weights, and evaluate the whole network. Slow on purpose; never used to produce results.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from torch import nn

from model.convs import ConvSite
from runner.engine.prune import zero_weights

T = TypeVar("T")


def seed_loop(fresh: Callable[[], nn.Module], conv: ConvSite, target: str, ks: Sequence[int],
              rank: Callable[[nn.Module], Sequence[int]], score: Callable[[nn.Module], T]) -> list[T]:
    """`score` of the network with the `rank` order's first K channels zeroed, for every K, from scratch."""
    out = []
    for k in ks:
        model = fresh()  # reload the weights
        order = rank(model)  # rank again (the seed did, for every K)
        zero_weights(model, conv, target, order[:k])
        out.append(score(model))
    return out
