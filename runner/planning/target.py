"""A prune job on its target (docs/latency.md): the latency table of the job's units, the curves planned with
it, the measured latency that `Planner.fit` meets a `{latency: f}` budget with, and every plan timed there.

The table holds, per unit, every K a plan may choose (`curves.choices` with the grid's round_to and min_keep;
`round_to: auto` measures them all at round_to 1 and then keeps the lower envelope). A plan is timed the way
its entries were: in alternation with the base model, on the target; for an onnxruntime target the file timed
is the plan's own pruned.onnx.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from runner.config import Grid, TargetConfig
from runner.errors import InputError
from runner.planning.curves import Curve, choices
from runner.planning.removal import pruned_copy, removal_from
from runner.planning.table import FOLDER, Table, avoided, fill_table, latency_curves
from runner.planning.timing import Rounds, Spread, Timer, check_target, key_file, target_key

log = logging.getLogger(__name__)

Export = Callable[[Path, nn.Module], None]  # (path, network) -> pruned.onnx-style file, normalisation inside

# A timed plan fits a latency budget when its kept fraction plus this many standard errors does: a plan whose
# median just meets the budget misses it on about half of its later timings.
FIT_SE = 2.0


@dataclass(frozen=True)
class Timed:
    """A plan timed on the target against the base, in the same rounds."""

    ms: float
    low: float
    high: float
    base_ms: float
    ratio: float | None = None  # median over the rounds of its time over the base's (None: ms / base_ms)
    se: float | None = None  # the standard error of `kept`

    @property
    def kept(self) -> float:
        """Its time as a fraction of the base's: paired round by round where the rounds gave a ratio."""
        return self.ms / self.base_ms if self.ratio is None else self.ratio

    @property
    def bound(self) -> float:
        """`kept` plus FIT_SE standard errors (`kept` itself when the rounds gave no error): what must fit."""
        return self.kept + FIT_SE * (self.se or 0.0)


def table_ks(curves: Sequence[Curve], round_to: int | str, min_keep: float) -> dict[str, list[int]]:
    """Per unit, the K > 0 a plan may choose: what the table measures."""
    step = 1 if round_to == "auto" else int(round_to)
    return {c.unit: [o.k for o in choices(c, step, min_keep) if o.k] for c in curves}


@dataclass
class OnTarget:
    target: TargetConfig
    timer: Timer
    table: Table
    path: Path
    curves: list[Curve]  # the sweep's curves at the table's K, with their latency savings
    fast: list[Curve]  # those curves at the K on the table's lower envelope: what a latency budget plans with
    seconds: float  # measuring the table in this job (0 when every entry was reused)
    measured: int  # entries measured in this job
    avoided: dict[str, list[int]]  # round_to auto: per unit, channel counts off the lower envelope

    @property
    def label(self) -> str:
        return self.target.label

    def curves_for(self, kind: str) -> list[Curve]:
        """What a budget of `kind` plans with: a latency budget only the K on the table's lower envelope (a K
        slower than a smaller K of its unit costs time and accuracy both), others every K the table has."""
        return self.fast if kind == "latency" else self.curves

    def time(self, model: nn.Module | Path) -> Timed:
        base, pruned = self.timer.pair(model)
        return Timed(pruned.median, pruned.low, pruned.high, base.median, pruned.ratio, pruned.ratio_se)

    def count(self, base: nn.Module, orders: Mapping[str, Sequence[int]], image_size: int,
              on_count: Callable[[Mapping[str, int], Timed], None] | None = None
              ) -> Callable[[Mapping[str, int]], float]:
        """`Planner.fit`'s count for a latency budget: the plan removed for real and timed against the base; the
        upper bound of its kept fraction of the base in those rounds (`Timed.bound`) times the table's base time
        (ms), so that a plan which fits keeps fitting when it is timed again."""
        def count(ks: Mapping[str, int]) -> float:
            t = self.time(pruned_copy(base, removal_from(ks, orders), image_size))
            if on_count is not None:
                on_count(ks, t)
            return t.bound * self.table.base_ms

        return count

    def fastest(self) -> dict[str, int]:
        """Every unit at the K whose table entry saves most (K = 0 where none saves anything)."""
        return {c.unit: max(c.points, key=lambda o: (o.latency, -o.k)).k for c in self.curves}

    def best_kept(self) -> float:
        """The least fraction of the base's time the table predicts a plan can keep: every unit at its fastest K."""
        return self.table.predict(self.fastest()) / self.table.base_ms

    def check_budget(self, label: str, keep: float, count: Callable[[Mapping[str, int]], float] | None = None
                     ) -> None:
        """A one-line InputError when no plan can keep `keep` of the base's time: by the table's prediction, or,
        when `count` is given (the measured time in ms, as `count` gives it: `Timed.bound`), by timing the fastest
        plan."""
        best, how = self.best_kept(), "the latency table says"
        if keep >= best and count is not None:
            best = count(self.fastest()) / self.table.base_ms
            how = "timing every unit at its fastest K (plus two standard errors) shows"
        if keep < best:
            raise InputError("plan.budgets", label, f"{how} no plan keeps less than {best:.3f} of the base's time "
                             f"on {self.label}", f"latency >= {best:.3f}", f"ask for "
                             f"{{latency: {min(0.99, best + 0.005):.2f}}} or more, or lower plan.min_keep")

    def close(self) -> None:
        self.timer.close()


def open_target(grid: Grid, base: nn.Module, orders: Mapping[str, Sequence[int]], curves: Sequence[Curve],
                base_sha256: str, image_size: int, export: Export, rounds: Rounds | None = None) -> OnTarget:
    """The job's target: checked, its table filled (cached entries reused), the curves planned with it."""
    target = grid.plan.target
    assert target is not None
    check_target(target)
    key = target_key(target, base_sha256, image_size)
    path = Path(grid.folder) / FOLDER / key_file(key)
    timer = Timer(target, copy.deepcopy(base), image_size, export, rounds or Rounds(precision=target.precision))

    def measure(unit: str, k: int) -> tuple[Spread, Spread]:
        return timer.pair(pruned_copy(base, removal_from({unit: k}, orders), image_size))

    wanted = table_ks(curves, grid.plan.round_to, grid.plan.min_keep)
    started = time.perf_counter()
    table, measured = fill_table(path, key, wanted, measure, precision=timer.rounds.precision,
                                 passes=target.passes)
    seconds = time.perf_counter() - started
    auto = grid.plan.round_to == "auto"
    skipped = {c.unit: avoided(table, c.unit, c.channels, wanted[c.unit]) for c in curves} if auto else {}
    if auto:
        n = sum(len(v) for v in skipped.values())
        log.info("round_to auto: %d channel counts are slower than a larger count and never chosen%s", n,
                 (": " + "; ".join(f"{u} keeps {v}" for u, v in skipped.items() if v)) if n else "")
    return OnTarget(target, timer, table, path, latency_curves(curves, table, wanted, auto),
                    latency_curves(curves, table, wanted, True), seconds, measured, skipped)


def latency_columns(on: OnTarget, timed: Timed, ks: Mapping[str, int], overlap: float = 1.0
                    ) -> dict[str, float | str]:
    """plans.csv's columns for a plan timed on the target, with the table's prediction: the base less the
    units' summed savings times `overlap`, the counted MACs saving of the whole plan over the units' summed
    MACs savings (a conv between two pruned units shows in both units' savings, in MACs and in time alike);
    `latency_summed_ms` is the prediction without it. Each kept fraction comes with its standard error: the
    measured one's from its rounds, the predicted one's from the table's entries (empty where they have none)."""
    summed = on.table.predict(ks)
    predicted = on.table.base_ms - overlap * (on.table.base_ms - summed)
    se = on.table.se(ks)
    return {"target": on.label, "latency_ms": timed.ms, "latency_low": timed.low, "latency_high": timed.high,
            "latency_kept": timed.kept, "latency_kept_se": math.nan if timed.se is None else timed.se,
            "latency_predicted_ms": predicted, "latency_base_ms": timed.base_ms,
            "latency_predicted_kept": predicted / on.table.base_ms,
            "latency_predicted_se": math.nan if se is None else overlap * se,
            "latency_summed_ms": summed, "macs_overlap": overlap}


def table_words(on: OnTarget, job_seconds: float = 0.0) -> dict[str, Any]:
    """The table as plain data for the report, W&B and `scripts/bench.py --latency` (runner.outputs.latency)."""
    return {"latency": {"target": on.label, "key": on.table.key, "file": str(on.path), "base_ms": on.table.base_ms,
                        "rows": on.table.rows(), "entries": on.table.size, "measured": on.measured,
                        "table_seconds": on.seconds, "entry_seconds": on.table.seconds, "job_seconds": job_seconds,
                        "avoided": on.avoided, "auto": bool(on.avoided)}}
