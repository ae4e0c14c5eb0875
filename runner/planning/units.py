"""The units a plan may prune, their channel orders and their measured curves.

With `unit: group` every swept group is a unit: removing its channels removes them from every member, which
is what the sweep measured. With `unit: layer` only a conv whose output channels can be removed on their own
is a unit (`removal.removable_alone`): a conv that feeds a residual addition was measured alone, but removing
its channels for real takes the whole residual stream with it, so its curve says nothing about that removal;
it is left out, with the reason, and the report lists it.

A unit's order is the plan criterion's ranking from rankings.json, as output channels of the conv that names
the unit (a group's channels mapped through that conv's member indices); its curve is the criterion's points
from results.csv (repeat 0: the plan criterion is never a drawn one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from model.groups import Group
from runner.errors import InputError
from runner.planning.curves import Curve, curve
from runner.planning.removal import removable_alone

RANKINGS_FIX = "run prune-sweep sweep again in this folder (with --resume) so that rankings.json is complete"


@dataclass(frozen=True)
class Units:
    channels: dict[str, int]  # unit -> its output channels, in forward order
    orders: dict[str, list[int]]  # unit -> its naming conv's output channels, lowest score first
    left_out: dict[str, str]  # swept units a plan does not touch -> why


def plan_units(model: nn.Module, swept: Mapping[str, Any], unit: str, criterion: str,
               rankings: Mapping[str, Mapping[str, Any]], image_size: int) -> Units:
    """The units of a plan from the sweep's units (`TrialPlan.units`: ConvSites or Groups) and rankings.json."""
    left_out: dict[str, str] = {}
    names = list(swept)
    if unit == "layer":
        why = removable_alone(model, names, image_size)
        left_out = {u: reason for u, reason in why.items() if reason}
        names = [u for u in names if u not in left_out]
    channels, orders = {}, {}
    for name in names:
        key = f"{name}/{criterion}"
        entry = rankings.get(key)
        if entry is None or not isinstance(entry.get("order"), list):
            raise InputError("rankings.json", key, "no ranking for this unit and criterion", "the ranking the "
                             "sweep wrote for every (unit, criterion)", RANKINGS_FIX)
        s = swept[name]
        if isinstance(s, Group):
            order = [int(i) for c in entry["order"] for i in s.member(name, "out").local([c])]
            size = s.channels
        else:
            order, size = [int(i) for i in entry["order"]], s.out_channels
        if sorted(order) != list(range(size)):
            raise InputError("rankings.json", key, f"not an order of the unit's {size} channels",
                             f"a permutation of 0..{size - 1}", RANKINGS_FIX)
        channels[name], orders[name] = size, order
    return Units(channels, orders, left_out)


def unit_curves(rows: Iterable[Mapping[str, Any]], channels: Mapping[str, int], criterion: str) -> list[Curve]:
    """Each unit's curve from results.csv rows: K, accuracy drop (points), MACs and params removed."""
    points: dict[str, list[Mapping[str, Any]]] = {u: [] for u in channels}
    for r in rows:
        if r["criterion"] == criterion and r["layer"] in points and int(r.get("repeat") or 0) == 0:
            points[r["layer"]].append(r)
    missing = [u for u, p in points.items() if not p]
    if missing:
        raise InputError("results.csv", missing[0], f"no measured point of criterion {criterion}",
                         "the sweep's points for every unit", "run the sweep again with --resume")
    return [curve(u, channels[u], [int(r["k"]) for r in p], [float(r["accuracy_drop"]) for r in p],
                  [float(r["macs_removed"]) for r in p], [float(r["params_removed"]) for r in p])
            for u, p in points.items()]


def plan_criterion(wanted: str | None, swept: Sequence[str], draws: Mapping[str, bool]) -> str:
    """The criterion a plan uses: `plan.criterion`, or the first swept criterion that ranks channels (not a
    drawn one such as random, and not seed, which zeroes inputs)."""
    usable = [c for c in swept if not draws.get(c) and c != "seed"]
    if wanted is None:
        if not usable:
            raise InputError("plan.criterion", None, "no swept criterion ranks channels for a plan",
                             "a criterion of sweep.criteria other than random and seed",
                             "add one (e.g. l1_norm) to sweep.criteria")
        return usable[0]
    if wanted not in usable:
        raise InputError("plan.criterion", wanted, "not a swept criterion a plan can use",
                         ", ".join(usable) or "a criterion of sweep.criteria other than random and seed",
                         "choose one of those, or add it to sweep.criteria")
    return wanted
