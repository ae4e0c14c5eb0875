"""plan.json's content: what a plan chose per unit, what it predicted, what was measured and counted."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from runner.planning.correction import Corrected, Measured
from runner.planning.removal import Counts
from runner.planning.solve import Plan


def _measured(m: Measured | None) -> dict[str, float | None]:
    return {"drop": m.drop, "low": m.low, "high": m.high} if m else {"drop": None, "low": None, "high": None}


def plan_record(plan: Plan, budget: str, keep: float, channels: Mapping[str, int],
                removal: Mapping[str, Sequence[int]], counted: Counts, base: Counts,
                corrected: Corrected | None = None, left_out: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The plan.json of one plan: per unit K, channels kept, predicted drop and the channels removed; the
    predicted and measured drop of the combined plan, its corrections, and the counted MACs / params."""
    units = [{"unit": u, "channels": channels[u], "k": o.k, "kept": channels[u] - o.k,
              "predicted_drop": o.drop, "interpolated": not o.measured, "removed": list(removal.get(u, []))}
             for u, o in plan.choice.items()]
    moves = [{"unit": m.unit, "k_from": m.k_from, "k_to": m.k_to, "predicted_drop": m.predicted,
              "measured": _measured(m.measured)} for m in (corrected.moves if corrected else ())]
    return {
        "budget": budget, "kind": plan.kind, "keep": keep, "method": plan.method,
        "required_savings": plan.required, "planned_savings": plan.saving,
        "predicted_drop": plan.predicted_drop,
        "measured": _measured(corrected.measured if corrected else None),
        "first_measured": _measured(corrected.first if corrected else None),
        "accepted": corrected.accepted if corrected else None,  # the correction loop ended on an accepted plan
        "measured_plans": corrected.measured_plans if corrected else 0,
        "last_corrected": ({u: o.k for u, o in corrected.last.choice.items()}
                           if corrected and corrected.last is not None else None),
        "corrections": moves, "caps": dict(plan.caps),
        "macs": counted.macs, "params": counted.params, "base_macs": base.macs, "base_params": base.params,
        "macs_kept": counted.macs / base.macs, "params_kept": counted.params / base.params,
        "units": units, "left_out": dict(left_out or {}),
    }
