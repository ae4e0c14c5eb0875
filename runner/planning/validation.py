"""What `prune-sweep validate` measures of a plan besides fine-tuning it: random plans that meet a budget, a plan's
predicted drop read from a set of curves. Plain Python: no torch.

- Random plans: each unit draws a ratio r_u in [0, 1) (seeded per budget and plan); at scale t the unit removes
  K_u(t) = the largest allowed K (round_to, min_keep) at most min(1, t * r_u) x its cap, the cap being its largest
  allowed K within the measured range. K_u grows with t, so the counted model shrinks with t: t is bisected over
  the scales where some K steps up, to the smallest whose pruned model meets the budget. The channels removed are
  the plan criterion's order, as for every plan.
- Predicted drop: the sum of the units' curve drops at their K (a K beyond a curve's measured range reads the
  largest measured K's drop), over the units that have a curve.

A plan's one-shot accuracy after adaptive BN is `runner.planning.adaptive.score_recalibrated`'s, the sweep's
own recalibration applied to the whole plan.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from runner.planning.curves import Curve, allowed_keeps


def predicted_drop(ks: Mapping[str, int], curves: Sequence[Curve]) -> float:
    """Summed curve drops at the plan's K (module docstring)."""
    by_unit = {c.unit: c for c in curves}
    total = 0.0
    for unit, k in ks.items():
        c = by_unit.get(unit)
        if c is not None and k:
            total += c.at(k).drop if k <= c.kmax else c.points[-1].drop
    return total


def _allowed_ks(c: Curve, round_to: int, min_keep: float) -> list[int]:
    """K values a plan may take for this unit within its measured range, ascending, 0 first."""
    return [0] + sorted(k for k in (c.channels - keep for keep in allowed_keeps(c.channels, round_to, min_keep))
                        if 0 < k <= c.kmax)


def random_plan(curves: Sequence[Curve], ratios: Sequence[float], target: float,
                count: Callable[[Mapping[str, int]], float], round_to: int = 1,
                min_keep: float = 0.0) -> dict[str, int] | None:
    """One random plan (module docstring): K per unit whose counted model keeps at most `target` MACs or params
    (`count(ks)` counts the pruned model); None when even every unit at its cap misses the target."""
    options = {c.unit: _allowed_ks(c, round_to, min_keep) for c in curves}
    weights = dict(zip((c.unit for c in curves), ratios))

    def at(t: float) -> dict[str, int]:
        out = {}
        for unit, ks in options.items():
            want = min(1.0, t * weights[unit]) * ks[-1]
            out[unit] = max(k for k in ks if k <= want + 1e-9)
        return out

    # the scales where some unit's K steps up: the plan is constant between two of them
    steps = sorted({k / ks[-1] / weights[u] for u, ks in options.items() if weights[u] > 0 for k in ks[1:]})
    if not steps or count(at(steps[-1])) > target:
        return None
    low, high = -1, len(steps) - 1  # steps[high] fits; every step up to low misses (-1: none known)
    while high - low > 1:
        mid = (low + high) // 2
        if count(at(steps[mid])) <= target:
            high = mid
        else:
            low = mid
    return at(steps[high])


def draw_ratios(seed: int, budget_index: int, plan_index: int, units: int) -> list[float]:
    """The per-unit ratios of one random plan: seeded by the grid's validate.seed, the budget and the plan."""
    return np.random.default_rng([seed, budget_index, plan_index]).random(units).tolist()
