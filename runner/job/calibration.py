"""Before any trial: every ranking, from one calibration pass on the driver, kept in rankings.json.

The first run of a sweep ranks every (layer, criterion) and writes rankings.json; `--resume` reads the orders
back from it (a ranking recomputed on other hardware can differ, and one curve must never mix two orders), and
ranks only the trials the file does not hold yet (a resumed grid that adds layers or criteria). The baseline is
not measured here: every trial measures its own, through its own cached suffix, on its own device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import Checkpoint
from model.convs import ConvSite
from model.groups import Group
from runner.config import Grid
from runner.engine.criteria import CRITERIA, Ranking, group_rankings, rank_all
from runner.engine.device import pick_device, place
from runner.engine.measure import EvalSet
from runner.engine.prune import channels_of
from runner.errors import InputError
from runner.inputs.data import Dataset
from runner.inputs.trials import Trial, TrialPlan
from runner.outputs.rankings import NAME, read_rankings, write_rankings
from runner.outputs.results import TrialId

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibrated:
    """Every ranking the trials need, how many of them came from rankings.json, and what rankings.json should
    hold now (None: nothing new to write; the sweep writes it once it holds the output folder)."""

    rankings: dict[tuple[str, str], Ranking]
    reused: int = 0
    entries: dict[str, Any] | None = None

    @property
    def said(self) -> str:
        """The calibration in one line, for the log."""
        ranked = len(self.rankings) - self.reused
        return f"{len(self.rankings)} rankings: {self.reused} read from {NAME}, {ranked} from one calibration pass"

    def save(self, folder: Path) -> None:
        """rankings.json in the output folder, when this calibration ranked something new."""
        if self.entries is not None:
            write_rankings(folder / NAME, self.entries)


def calibrate(grid: Grid, plan: TrialPlan, data: Dataset, loaded: Checkpoint, resume: bool = False) -> Calibrated:
    """Every ranking: read from rankings.json on --resume, the others from one calibration pass."""
    path = grid.folder / NAME
    entries = read_rankings(path) if resume and path.is_file() else {}
    table = plan.units
    rankings = {(t.layer, t.criterion): ranking_from_entry(entries[t.id.key], table[t.layer], t.criterion, t.target,
                                                            t.repeats)
                for t in plan.trials if t.id.key in entries}
    reused = len(rankings)
    missing = [t for t in plan.trials if (t.layer, t.criterion) not in rankings]
    if missing:
        rankings |= rank_trials(grid, plan, data, loaded, missing)
        entries |= {TrialId(*key).key: entry_of(rankings[key]) for key in
                    [(t.layer, t.criterion) for t in missing]}
    if reused:
        log.debug("%d rankings read from %s%s", reused, path,
                 f"; {len(missing)} ranked now and added to it" if missing else "")
    return Calibrated(rankings, reused, entries if missing else None)


def rank_trials(grid: Grid, plan: TrialPlan, data: Dataset, loaded: Checkpoint, trials: list[Trial] | None = None
                ) -> dict[tuple[str, str], Ranking]:
    """The rankings of `trials` (all of the plan's by default) from one calibration pass; nothing written."""
    trials = list(plan.trials) if trials is None else trials
    device = pick_device()
    model = place(loaded.model, device)
    mean, std = loaded.normalisation
    bs = grid.sweep.batch_size
    calib = data.calibration if grid.sweep.calibration == "holdout" else data.test
    cal = EvalSet.build(calib, mean, std, len(data.classes), device, bs)
    layers = [c for c in plan.layers if any(t.layer == c.name for t in trials)]
    criteria = [c for c in plan.criteria if any(t.criterion == c for t in trials)]
    started = time.time()
    if plan.unit == "group":  # members' rankings aggregated per group (criteria.group_rankings)
        wanted = {t.layer for t in trials}
        groups = [g for g in plan.groups if g.name in wanted]
        members = {m.name for g in groups for m in g.members if m.kind == "conv" and m.dim == "out"}
        layers = [c for c in plan.ranked if c.name in members]
    rankings = rank_all(model, layers, criteria, plan.target, torch.cat(cal.inputs), torch.cat(cal.labels), bs,
                        grid.sweep.random_seed, grid.sweep.random_repeats)
    if plan.unit == "group":
        rankings = group_rankings(groups, rankings)
    # debug: a sweep ranks while Ray starts and says how it went only once its checks have passed (Calibrated.said)
    log.debug("%d rankings from one pass over %d %s images (%.1f s)", len(rankings), cal.count,
              grid.sweep.calibration, time.time() - started)
    loaded.model.cpu()  # the state_dict travels to the trials from host memory
    return {(t.layer, t.criterion): rankings[(t.layer, t.criterion)] for t in trials}


def entry_of(ranking: Ranking) -> dict[str, Any]:
    """A ranking as its rankings.json entry."""
    if CRITERIA[ranking.criterion].draws:
        return {"order": [list(o) for o in ranking.orders], "scores": [list(s) for s in ranking.all_scores],
                "seeds": list(ranking.seeds)}
    return {"order": list(ranking.order), "scores": list(ranking.scores)}


def ranking_from_entry(entry: dict[str, Any], conv: ConvSite | Group, criterion: str, target: str, repeats: int
                       ) -> Ranking:
    """A rankings.json entry, checked against the layer: every order a permutation of its channels."""
    draws = CRITERIA[criterion].draws
    orders, scores = (entry["order"], entry["scores"]) if draws else ([entry["order"]], [entry["scores"]])
    channels = channels_of(conv, target)
    key = TrialId(conv.name, criterion).key
    fix = "restore it, or delete it to rank again (points already in results.csv keep their order)"
    if len(orders) != repeats or len(scores) != repeats:
        raise InputError(f"{NAME}: {key}", f"{len(orders)} orders", f"this sweep draws {repeats}",
                         f"{repeats} orders and score lists", fix)
    for order, score in zip(orders, scores):
        if not isinstance(order, list) or not all(type(i) is int for i in order) or \
                sorted(order) != list(range(channels)) or not isinstance(score, list) or len(score) != channels:
            raise InputError(f"{NAME}: {key}", order, f"not an order of the layer's {channels} channels",
                             f"a permutation of 0..{channels - 1} and {channels} scores", fix)
    return Ranking(conv.name, criterion, target, tuple(tuple(float(v) for v in s) for s in scores),
                   tuple(tuple(int(i) for i in o) for o in orders),
                   tuple(int(s) for s in entry.get("seeds", ())) if draws else ())
