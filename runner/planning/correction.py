"""The combined plan, measured and corrected. Plain Python: the measurement is a callable.

A plan's predicted drop is the sum of its units' drops, each measured alone; sensitivities do not add, so the
plan is measured with all its masks at once (one pass over the eval set) and compared with that sum. The
plan is accepted when `measured <= predicted + interval`, the interval being the measured drop's own lower
half-width (`drop - low` of its paired 95% interval): the prediction is not below the measured interval.

While it is not accepted, one move: for every unit the plan prunes, re-plan with that unit capped one K
lower (K <= k - 1; the method re-balances the other units to keep the budget), and measure each re-plan; the
move whose plan measures the least drop is taken (ties: the lower predicted drop, then the unit's name). The
prediction cannot say which units interact, the measurement can: a move that separates two units that hurt
together measures low. Caps accumulate, so budget moves away from the units whose combination hurt. The loop
ends when a plan is accepted, when no move is left (every pruned unit capped to where the budget can no longer
be met), or after `max_moves` moves. Cost: one eval pass per candidate (plans seen before are not measured
again), at most 1 + max_moves x (units pruned) passes.

With `search` the loop does not stop at an accepted plan: it takes every move it can, up to `max_moves`, so
the plan kept is the best measured along a greedy path (a search on measured accuracy, as EagleEye selects
among candidate plans by their accuracy after adaptive BN) rather than the first the prediction explains.

The plan kept is the one that measured the least drop of every plan measured on the way (the path's plans and
every candidate: each meets the budget), ties to the lower predicted drop: usually the last, accepted one, but a
later move can measure worse than an earlier candidate (its prediction rose more than its measurement fell), and
measuring is what the loop is for. All of it happens on the images that choose the plan; the final figures come
from the scoring images (`plan.score_on`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from runner.planning.solve import Plan


@dataclass(frozen=True)
class Measured:
    """A combined plan's measured accuracy drop and its paired 95% interval (points)."""

    drop: float
    low: float
    high: float


@dataclass(frozen=True)
class Move:
    unit: str
    k_from: int
    k_to: int  # the unit's K in the re-plan (at most k_from - 1)
    predicted: float  # the re-plan's predicted drop
    measured: Measured


@dataclass(frozen=True)
class Corrected:
    plan: Plan  # the plan kept: the least measured drop of all plans measured (module docstring)
    measured: Measured
    accepted: bool  # whether the loop ended on an accepted plan
    moves: tuple[Move, ...]
    first: Measured  # the uncorrected plan's measurement
    measured_plans: int = 1  # plans measured (one eval pass each)
    last: Plan | None = None  # where the moves ended (the kept plan unless an earlier one measured less)


def accepts(plan: Plan, m: Measured) -> bool:
    """measured <= predicted + the measured drop's lower half-width."""
    return m.drop <= plan.predicted_drop + (m.drop - m.low)


def correct(plan: Plan, replan: Callable[[Mapping[str, int]], Plan | None], measure: Callable[[Plan], Measured],
            max_moves: int = 8, on_move: Callable[[Move, Plan], None] | None = None, search: bool = False
            ) -> Corrected:
    """Measure `plan`; while not accepted (with `search`: whether or not), take the move whose re-plan measures
    least (module docstring).

    `replan(caps)`: the same method and budget with every unit's K at most caps[unit] (None when the budget
    cannot be met); `measure(plan)`: the drop with all of the plan's masks at once; `on_move(move, plan)`: told
    of every move taken (progress)."""
    seen: dict[tuple, tuple[Plan, Measured]] = {}

    def measured(p: Plan) -> Measured:
        key = tuple(sorted(p.ks.items()))
        if key not in seen:
            seen[key] = (p, measure(p))
        return seen[key][1]

    first = m = measured(plan)
    moves: list[Move] = []
    caps = dict(plan.caps)
    while (search or not accepts(plan, m)) and len(moves) < max_moves:
        candidates = []
        for unit, k in sorted(plan.ks.items()):
            tighter = {**caps, unit: k - 1}
            cand = replan(tighter) if k > 0 else None
            if cand is not None:
                candidates.append((measured(cand).drop, cand.predicted_drop, unit, cand, tighter))
        if not candidates:
            break
        _, _, unit, cand, caps = min(candidates, key=lambda c: c[:3])
        m = measured(cand)
        moves.append(Move(unit, plan.ks[unit], cand.ks[unit], cand.predicted_drop, m))
        if on_move is not None:
            on_move(moves[-1], cand)
        plan = cand
    accepted = accepts(plan, m)
    kept, kept_m = min(seen.values(), key=lambda pm: (pm[1].drop, pm[0].predicted_drop))
    return Corrected(kept, kept_m, accepted, tuple(moves), first, len(seen), plan)
