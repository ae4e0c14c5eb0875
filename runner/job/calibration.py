"""Before any trial: the baseline accuracy and every ranking, from one calibration pass on the driver."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from model.checkpoint import Checkpoint
from runner.config import Grid
from runner.engine.criteria import Ranking, group_rankings, rank_all
from runner.engine.device import fast_math, pick_device, place
from runner.engine.evaluate import evaluate
from runner.engine.measure import EvalSet
from runner.inputs.data import Dataset
from runner.inputs.trials import TrialPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibrated:
    """What the driver measured before the trials: the baseline accuracy and every ranking."""

    baseline: float
    rankings: dict[tuple[str, str], Ranking]


def calibrate(grid: Grid, plan: TrialPlan, data: Dataset, loaded: Checkpoint) -> Calibrated:
    """Baseline accuracy and every ranking (one calibration pass), before any trial starts."""
    device = pick_device()
    model = place(loaded.model, device)
    mean, std = loaded.normalisation
    bs = grid.sweep.batch_size
    evalset = EvalSet.build(data.test, mean, std, len(data.classes), device, bs)
    with fast_math(device):
        baseline = evaluate(model, evalset.inputs, evalset.labels, len(data.classes)).result().accuracy
    calib = data.calibration if grid.sweep.calibration == "holdout" else data.test
    cal = EvalSet.build(calib, mean, std, len(data.classes), device, bs)
    started = time.time()
    with fast_math(device):
        rankings = rank_all(model, list(plan.ranked), list(plan.criteria), plan.target, torch.cat(cal.inputs),
                            torch.cat(cal.labels), bs, grid.seed)
    if plan.unit == "group":  # members' rankings aggregated per group (criteria.group_rankings)
        rankings = group_rankings(plan.groups, rankings)
    log.info("baseline accuracy %.2f%% on %d images; %d rankings from one pass over %d %s images (%.1f s)",
             baseline, evalset.count, len(rankings), cal.count, grid.sweep.calibration, time.time() - started)
    loaded.model.cpu()  # the state_dict travels to the trials from host memory
    return Calibrated(baseline, rankings)
