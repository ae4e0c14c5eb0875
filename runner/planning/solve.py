"""Plans: one K per unit under a MACs or params budget, by three methods. Plain Python: no torch.

A budget keeps a fraction `keep` of the base model's MACs (or params), so the units together must save at
least `required = base_total * (1 - keep)`. Each method sees per unit only its options (`curves.choices`):
K, predicted drop, and the savings of removing K channels of that unit alone.

- `knapsack`: the multiple-choice knapsack, solved exactly: one option per unit (K = 0 included), the least
  summed predicted drop whose summed savings reach `required`. Dynamic programming over the units on the
  exact savings (no discretised axis, so nothing is rounded and the budget is never missed by rounding):
  after each unit only the Pareto front of (savings, drop) is kept, a state being dropped only when another
  saves at least as much with no more drop, and savings are capped at `required` (every state that reaches
  the budget is as good as any other that does). Exact by construction; tests compare it with brute force.
- `threshold`: one drop threshold t for every unit, each taking its largest K with predicted drop <= t;
  t is binary-searched over the measured drops for the smallest that reaches `required` (what PaddleSlim,
  AIMET and ModelOpt do).
- `uniform`: one kept ratio r for every unit (kept channels rounded up to the allowed counts), the largest r
  that reaches `required`: the usual baseline. Its drops and savings are interpolated between measured points.

Savings do not add exactly: removing a unit's channels also shrinks the next conv's input, and two units
can share that conv, so summed per-unit savings can overstate the real saving. `Planner.fit` therefore
counts every plan on the physically pruned model and, while the counted model misses the budget, asks the
method again for `shortfall` more savings than its plan predicted, then bisects the request between the
largest that missed and the smallest that fit (see `fit`).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from runner.planning.curves import Curve, Option, allowed_keeps, choices

Caps = Mapping[str, int]  # unit -> the largest K a plan may take there (set by the combined-plan correction)


@dataclass(frozen=True)
class Plan:
    method: str
    kind: str  # macs | params
    required: float  # savings asked of the method (the budget's, or more after `fit` tightened it)
    choice: Mapping[str, Option]  # unit -> its option
    counted_kept: float | None = None  # MACs / params counted on the physically pruned model (`fit`)
    caps: Mapping[str, int] = field(default_factory=dict)

    @property
    def ks(self) -> dict[str, int]:
        return {u: o.k for u, o in self.choice.items()}

    @property
    def predicted_drop(self) -> float:
        return sum(o.drop for o in self.choice.values())

    @property
    def saving(self) -> float:
        """Summed per-unit savings (what the method planned with; the counted model is the truth)."""
        return sum(o.saving(self.kind) for o in self.choice.values())


Choice = dict[str, Option]


@dataclass(frozen=True)
class Rules:
    """What a plan may choose: kept channels a multiple of round_to, at least min_keep, K within caps."""

    round_to: int = 1
    min_keep: float = 0.0
    caps: Mapping[str, int] = field(default_factory=dict)
    points_only: bool = False  # uniform: only a curve's points (a latency table's K), never K between them

    def options(self, c: Curve) -> list[Option]:
        return [o for o in choices(c, self.round_to, self.min_keep) if o.k <= self.caps.get(c.unit, o.k)]


def knapsack(options: Mapping[str, Sequence[Option]], kind: str, required: float) -> Choice | None:
    """The exact multiple-choice knapsack (module docstring); None when even the largest options fall short."""
    units = list(options)
    front: list[tuple[float, float, int, int]] = [(0.0, 0.0, -1, -1)]  # savings, drop, parent state, option
    fronts = []
    for u in units:
        grown = [(min(s + o.saving(kind), required), d + o.drop, i, j)
                 for i, (s, d, _, _) in enumerate(front) for j, o in enumerate(options[u])]
        grown.sort(key=lambda t: (-t[0], t[1]))  # most savings first, then least drop
        front, best = [], math.inf
        for state in grown:
            if state[1] < best:  # not dominated by a state saving as much or more
                front.append(state)
                best = state[1]
        fronts.append(front)
    if front[0][0] < required:  # the front's first state has the most savings
        return None
    out, at = {}, 0
    for i in reversed(range(len(units))):  # walk back from the best final state
        _, _, parent, j = fronts[i][at]
        out[units[i]] = options[units[i]][j]
        at = parent
    return {u: out[u] for u in units}


def threshold(options: Mapping[str, Sequence[Option]], kind: str, required: float) -> Choice | None:
    """One drop threshold for every unit, binary-searched (module docstring)."""
    def at(t: float) -> Choice:
        return {u: [o for o in opts if o.drop <= t][-1] for u, opts in options.items()}  # K = 0: drop 0 <= t

    def saves(t: float) -> float:
        return sum(o.saving(kind) for o in at(t).values())

    ts = sorted({o.drop for opts in options.values() for o in opts})
    i = bisect.bisect_left(ts, True, key=lambda t: saves(t) >= required)  # savings grow with t
    return at(ts[i]) if i < len(ts) else None


def uniform_ratios(curves: Sequence[Curve], rules: Rules) -> list[float]:
    """The kept ratios uniform can take, from the largest (1: nothing pruned) down."""
    return sorted({x / c.channels for c in curves for x in _keeps(c, rules)}, reverse=True)


def uniform_at(curves: Sequence[Curve], rules: Rules, r: float) -> Choice:
    """Every unit at kept ratio `r`: its kept channels rounded up to an allowed count, K clipped to the measured
    range and to the unit's cap."""
    out = {}
    for c in curves:
        keeps = _keeps(c, rules)
        k = c.channels - next(x for x in keeps if x >= r * c.channels - 1e-9)
        limit = min(c.kmax, rules.caps.get(c.unit, c.channels))
        if k > limit:  # the largest allowed K within the measured range and the cap
            k = max(c.channels - x for x in keeps if c.channels - x <= limit)
        out[c.unit] = c.at(k)
    return out


def _keeps(c: Curve, rules: Rules) -> list[int]:
    if rules.points_only:
        return sorted(c.channels - p.k for p in c.points)
    return allowed_keeps(c.channels, rules.round_to, rules.min_keep) + [c.channels]


def uniform(curves: Sequence[Curve], kind: str, required: float, rules: Rules) -> Choice | None:
    """One kept ratio for every unit, the largest that reaches `required` (module docstring)."""
    ratios = uniform_ratios(curves, rules)
    i = bisect.bisect_left(ratios, True,
                           key=lambda r: sum(o.saving(kind) for o in uniform_at(curves, rules, r).values()) >= required)
    return uniform_at(curves, rules, ratios[i]) if i < len(ratios) else None


def _by_knapsack(curves: Sequence[Curve], kind: str, required: float, rules: Rules) -> Choice | None:
    return knapsack({c.unit: rules.options(c) for c in curves}, kind, required)


def _by_threshold(curves: Sequence[Curve], kind: str, required: float, rules: Rules) -> Choice | None:
    return threshold({c.unit: rules.options(c) for c in curves}, kind, required)


# the methods: (curves, budget kind, savings required, rules) -> one option per unit, or None when out of reach
METHODS: dict[str, Callable[[Sequence[Curve], str, float, Rules], Choice | None]] = {
    "knapsack": _by_knapsack, "threshold": _by_threshold, "uniform": uniform}


@dataclass(frozen=True)
class Planner:
    """The planning problem of one budget and method: the units' curves and the rules for K."""

    curves: Sequence[Curve]
    kind: str  # macs | params | latency
    keep: float  # fraction of base_total to keep
    base_total: float  # the base model's MACs / params, counted, or its time on the target (ms)
    method: str
    round_to: int = 1
    min_keep: float = 0.0
    points_only: bool = False  # K only at the curves' points (curves made from a latency table)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown planning method {self.method!r}; known: {', '.join(METHODS)}")

    @property
    def required(self) -> float:
        return self.base_total * (1 - self.keep)

    def plan(self, caps: Caps | None = None, required: float | None = None) -> Plan | None:
        """The method's plan for `required` savings (default the budget's), every K within `caps`."""
        caps = dict(caps or {})
        required = self.required if required is None else required
        rules = Rules(self.round_to, self.min_keep, caps, self.points_only)
        choice = METHODS[self.method](self.curves, self.kind, required, rules)
        return None if choice is None else Plan(self.method, self.kind, required, choice, caps=caps)

    def fit(self, count: Callable[[Mapping[str, int]], float], caps: Caps | None = None,
            max_rounds: int = 16, resolution: float = 1e-3, first: bool = False) -> Plan | None:
        """A plan whose model, counted (`count(ks)`: the pruned model's MACs or params), meets the budget.

        Tighten and re-plan. While no plan has fit, a plan whose counted model keeps `shortfall` more than the
        budget allows is followed by a request for the savings it predicted plus the shortfall (so every round
        asks for more than the last plan offered). Once one fits, the request is bisected between the largest
        that missed and the smallest that fit, down to `resolution` of the base model, because a step can
        overshoot (the options are discrete), and the fitting plan with the least predicted drop is kept.
        A plan for the budget's own request that fits at once is returned as it is; with `first` (a measured
        latency, whose median is noisy) the first plan that fits is returned, and uniform fits its one ratio
        on the measurement instead (`fit_ratio`). None when the method cannot save enough, or nothing fit within
        `max_rounds` counts."""
        if first and self.method == "uniform":
            return self.fit_ratio(count, caps, max_rounds)
        target = self.base_total * self.keep
        missed = fit = best = None  # the largest request that missed, the smallest that fit, the best plan
        required = self.required
        for _ in range(max_rounds):
            plan = self.plan(caps, required)
            if plan is None:
                break
            kept = count(plan.ks)
            plan = Plan(plan.method, plan.kind, plan.required, plan.choice, kept, plan.caps)
            if kept <= target:
                fit = required
                if best is None or plan.predicted_drop < best.predicted_drop:
                    best = plan
                if missed is None or first:
                    break
            else:
                missed = required
            if fit is None:
                required = plan.saving + (kept - target)
            elif fit - missed <= resolution * self.base_total:
                break
            else:
                required = (missed + fit) / 2
        return best

    def fit_ratio(self, count: Callable[[Mapping[str, int]], float], caps: Caps | None = None,
                  max_counts: int = 16) -> Plan | None:
        """Uniform's kept ratio fitted on `count` (a measured latency) as global's pruning ratio is: the ratios
        scanned down in steps of 0.1, then bisected between the last that missed and the first that fit, down
        to adjacent ratios or `max_counts` counts; the least pruning plan that fit. The summed savings of a
        uniform plan overstate its real saving most (every unit pruned at once), so a request-driven refit
        overshoots, and a measured time need not fall with the ratio (channel counts a kernel handles well or
        badly), so the ratio is found by measuring, not predicted. None when no ratio fits."""
        rules = Rules(self.round_to, self.min_keep, dict(caps or {}), self.points_only)
        ratios = [r for r in uniform_ratios(self.curves, rules) if r < 1 - 1e-9]
        target = self.base_total * self.keep
        tried: dict[int, Plan] = {}

        def fits(i: int) -> bool:
            if i not in tried:
                choice = uniform_at(self.curves, rules, ratios[i])
                ks = {u: o.k for u, o in choice.items()}
                tried[i] = Plan(self.method, self.kind, self.required, choice, count(ks), rules.caps)
            return tried[i].counted_kept <= target

        missed, fit = -1, None
        for step in range(1, 10):
            i = next((j for j, r in enumerate(ratios) if r <= 1 - step / 10 + 1e-9), None)
            if i is None or i <= missed:
                continue
            if fits(i):
                fit = i
                break
            missed = i
        if fit is None:
            i = len(ratios) - 1  # the most pruning ratio, below the scan's last step
            if i <= missed or not fits(i):
                return None
            fit = i
        while fit - missed > 1 and len(tried) < max_counts:
            mid = (missed + fit) // 2
            if fits(mid):
                fit = mid
            else:
                missed = mid
        return tried[fit]

