"""What `prune-sweep validate` measures of a plan besides fine-tuning it: random plans that meet a budget, a plan's
predicted drop read from a set of curves, and its one-shot accuracy after adaptive BatchNorm.

- Random plans: each unit draws a ratio r_u in [0, 1) (seeded per budget and plan); at scale t the unit removes
  K_u(t) = the largest allowed K (round_to, min_keep) at most min(1, t * r_u) x its cap, the cap being its largest
  allowed K within the measured range. K_u grows with t, so the counted model shrinks with t: t is bisected to
  the smallest whose pruned model meets the budget. The channels removed are the plan criterion's order, as for
  every plan.
- Predicted drop: the sum of the units' curve drops at their K (a K beyond a curve's measured range reads the
  largest measured K's drop), over the units that have a curve.
- Adaptive BN: every BatchNorm layer of the (pruned) network re-estimates its running statistics from scratch
  on the calibration hold-out images (cumulative average, `momentum=None`), every other layer in eval mode;
  then the network is scored.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

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
                count: Callable[[Mapping[str, int]], float], round_to: int = 1, min_keep: float = 0.0,
                tolerance: float = 1e-4) -> dict[str, int] | None:
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

    high = 1.0 / max(min(r for r in ratios if r > 0), 1e-6)  # every unit at its cap
    if count(at(high)) > target:
        return None
    low = 0.0
    while high - low > tolerance * high:
        mid = (low + high) / 2
        if at(mid) == at(high):
            high = mid
        elif count(at(mid)) <= target:
            high = mid
        else:
            low = mid
    return at(high)


def draw_ratios(seed: int, budget_index: int, plan_index: int, units: int) -> list[float]:
    """The per-unit ratios of one random plan: seeded by the grid's validate.seed, the budget and the plan."""
    return np.random.default_rng([seed, budget_index, plan_index]).random(units).tolist()


def recalibrate_bn(model: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Adaptive BN in place (module docstring); returns the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    saved = [m.momentum for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.eval()
    return model
