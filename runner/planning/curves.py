"""A unit's measured curve (K -> accuracy drop, and what removing K channels saves), made monotone, and the K a
plan may choose from it. Plain Python: no torch.

A unit is a layer (`unit: layer`) or a group of coupled channels (`unit: group`); either way it has `channels`
output channels and K of them are removed. Monotone: the predicted drop at K is the largest drop measured at
any K' <= K (and at least 0, the drop at K = 0), so removing more never predicts less loss, and noise never
makes a unit look safer than it was measured to be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from runner.errors import InputError

KINDS = ("macs", "params", "latency")


@dataclass(frozen=True)
class Option:
    """One K of one unit: its predicted drop (points) and what removing K channels of this unit alone saves."""

    k: int
    drop: float
    macs: float
    params: float
    measured: bool = True  # False: K lies between measured points; drop and savings are interpolated
    latency: float = 0.0  # ms saved on the plan's target (runner.planning.table); 0 without a target

    def saving(self, kind: str) -> float:
        return self.macs if kind == "macs" else self.params if kind == "params" else self.latency


@dataclass(frozen=True)
class Curve:
    unit: str
    channels: int
    points: tuple[Option, ...]  # K ascending from 0, drop and savings non-decreasing

    @property
    def kmax(self) -> int:
        """The largest measured K: nothing beyond it is predicted."""
        return self.points[-1].k

    def at(self, k: int) -> Option:
        """The option at any K in [0, kmax]: a measured point, or linear interpolation between its neighbours."""
        if not 0 <= k <= self.kmax:
            raise ValueError(f"{self.unit}: K={k} outside the measured range 0..{self.kmax}")
        hi = next(i for i, p in enumerate(self.points) if p.k >= k)
        b = self.points[hi]
        if b.k == k:
            return b
        a = self.points[hi - 1]
        w = (k - a.k) / (b.k - a.k)

        def mix(x: float, y: float) -> float:
            return x + w * (y - x)

        return Option(k, mix(a.drop, b.drop), round(mix(a.macs, b.macs)), round(mix(a.params, b.params)), False,
                      mix(a.latency, b.latency))


def curve(unit: str, channels: int, ks: Sequence[int], drops: Sequence[float], macs: Sequence[float],
          params: Sequence[float]) -> Curve:
    """A unit's curve from its measured points (any order, K = 0 optional), with the drop made monotone."""
    rows = sorted(zip(ks, drops, macs, params))
    seen = [r[0] for r in rows]
    if len(set(seen)) != len(seen) or any(not 0 <= k <= channels for k in seen):
        raise ValueError(f"{unit}: K values must be distinct and within 0..{channels}, got {seen}")
    if not rows or rows[0][0] != 0:
        rows.insert(0, (0, 0.0, 0, 0))
    points, worst = [], 0.0
    for k, drop, m, p in rows:
        worst = max(worst, float(drop)) if k else 0.0
        points.append(Option(int(k), worst, m, p))
    for a, b in zip(points, points[1:]):
        if b.macs < a.macs or b.params < a.params:
            raise ValueError(f"{unit}: savings must not fall as K grows (K={a.k} -> {b.k})")
    return Curve(unit, channels, tuple(points))


def allowed_keeps(channels: int, round_to: int, min_keep: float) -> list[int]:
    """Channel counts a plan may keep in a unit of `channels`, below `channels`, ascending: multiples of round_to,
    at least min_keep of the unit and at least one channel."""
    least = max(1, math.ceil(min_keep * channels - 1e-9))  # 1e-9: 0.1 * 30 is 3.0000000000000004
    return [keep for keep in range(round_to, channels, round_to) if keep >= least]


def choices(c: Curve, round_to: int = 1, min_keep: float = 0.0) -> tuple[Option, ...]:
    """The options a plan may choose for a unit: K = 0, and each measured K moved to the nearest allowed K (kept
    channels a multiple of round_to, at least min_keep) within the measured range; ties go to the smaller K.
    With round_to 1 every option is a measured point, except a K that would keep fewer than min_keep or no
    channel at all (moved to the largest allowed K, its drop interpolated)."""
    allowed = [c.channels - keep for keep in allowed_keeps(c.channels, round_to, min_keep)]
    allowed = sorted(k for k in allowed if k <= c.kmax)
    out = {0: c.points[0]}
    for p in c.points[1:]:
        if allowed:
            k = min(allowed, key=lambda a: (abs(a - p.k), a))
            out.setdefault(k, c.at(k))
    return tuple(out[k] for k in sorted(out))


def check_round_to(round_to: int, min_keep: float, channels: Mapping[str, int]) -> None:
    """Every plan needs a unit it may prune: raise (plan.round_to) when no unit has an allowed K besides 0 with
    this round_to and min_keep."""
    if channels and not any(allowed_keeps(c, round_to, min_keep) for c in channels.values()):
        widest = max(channels.values())
        raise InputError("plan.round_to", round_to, "no unit can be pruned with this round_to and min_keep",
                         f"a round_to below the widest unit's channels ({widest})",
                         "lower plan.round_to or plan.min_keep")
