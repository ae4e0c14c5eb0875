"""Ray Tune: one trial per (layer, criterion), run new or resumed from Tune's state (inside
`runner.job.cluster.ray_session`)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.progress_reporter import TrialProgressCallback

from model.checkpoint import Checkpoint
from runner.config import Grid
from runner.inputs.models import spec_of
from runner.inputs.data import Dataset
from runner.inputs.trials import TrialPlan
from runner.job.calibration import Calibrated
from runner.job.collector import Collector, Context
from runner.job.board import BoardStats, board_actor
from runner.job.trial import Shared, run_trial
from runner.outputs.results import TrialId, read_rows
from runner.outputs.tracking import Tracker, make_tracker

log = logging.getLogger(__name__)


GPU_SHARE = 0.25  # gpus_per_trial: auto -> four trials share a GPU (evaluation alone rarely fills one)


def trial_resources(grid: Grid) -> dict[str, float]:
    gpus = grid.resources.gpus_per_trial
    if gpus == "auto":
        gpus = GPU_SHARE if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"cpu": grid.resources.cpus_per_trial, "gpu": float(gpus)}


def trial_name(trial: Any) -> str:
    return f"{trial.config['layer']}-{trial.config['criterion']}"


def board_name(grid: Grid) -> str:
    return "prune-sweep-progress-" + hashlib.sha1(str(grid.folder).encode()).hexdigest()[:12]


def _shared(grid: Grid, plan: TrialPlan, data: Dataset, loaded: Checkpoint, rankings: dict) -> Shared:
    cache = None if grid.resources.cache_gb == "auto" else int(grid.resources.cache_gb * 2**30)
    mean, std = loaded.normalisation
    return Shared(spec=spec_of(grid.model),
                  state_dict=loaded.model.state_dict(), mean=mean, std=std, eval_images=data.test,
                  convs=plan.table, units=plan.units, rankings=rankings,
                  ks={(t.layer, t.criterion): t.ks for t in plan.trials}, board=board_name(grid),
                  batch_size=grid.sweep.batch_size, cache_bytes=cache, feature_maps=True,
                  token=_token(loaded.sha256, data, mean, std, grid.sweep.batch_size))


def _token(checkpoint_sha: str, data: Dataset, mean: tuple, std: tuple, batch_size: int) -> str:
    """What the trials' network and eval set are made of: equal tokens, equal tensors."""
    digest = hashlib.sha256(data.test.images.tobytes())
    digest.update(data.test.labels.tobytes())
    digest.update(repr((checkpoint_sha, mean, std, batch_size)).encode())
    return digest.hexdigest()


def _wandb_config(grid: Grid, loaded: Checkpoint, baseline: float) -> dict[str, Any]:
    return {**grid.as_dict(), "checkpoint_sha256": loaded.sha256, "baseline_accuracy": baseline}


def _context(grid: Grid, plan: TrialPlan, data: Dataset, loaded: Checkpoint, baseline: float,
             wandb_mode: str) -> Context:
    return Context(
        folder=str(grid.folder), sweep=grid.name, baseline=baseline, checkpoint_sha256=loaded.sha256,
        eval_images=len(data.test), wandb_mode=wandb_mode, wandb_project=grid.wandb.project,
        wandb_entity=grid.wandb.entity, wandb_config=_wandb_config(grid, loaded, baseline),
        feature_maps=grid.wandb.feature_maps,
        figure_ks={t.id.key: t.figure_ks(grid.sweep.feature_map_points) for t in plan.trials},
        total_points=plan.points, board=board_name(grid))


class QuietProgress(TrialProgressCallback):
    """Tune's console reporter, silenced: Tune adds one unless the callbacks hold one, and a restored
    experiment's copy prints "Trial ... completed" for every finished trial whatever the verbosity. The
    collector reports progress instead."""

    def _print(self, msg: str) -> None:
        log.debug("tune: %s", msg)


@dataclass
class TrialsOutcome:
    failed: list[str]  # trials that failed after their retries
    tracker: Tracker  # for the summary run
    board: BoardStats  # points measured in this run (repeats included), and when the first and last arrived


def can_restore(path: str) -> bool:
    if "://" not in path and not Path(path).is_dir():
        return False
    return tune.Tuner.can_restore(path)


def run_trials(grid: Grid, plan: TrialPlan, data: Dataset, loaded: Checkpoint, calibrated: Calibrated,
               experiment: str, restore: bool) -> TrialsOutcome:
    """Run (or resume) every trial, inside `ray_session`."""
    done = [(r["layer"], r["criterion"], r["k"]) for r in read_rows(grid.folder / "results.csv")]
    board = board_actor(board_name(grid), done)  # kept alive while the trials run
    shared = _shared(grid, plan, data, loaded, calibrated.rankings)
    trainable = tune.with_resources(tune.with_parameters(run_trial, shared=shared), trial_resources(grid))
    path = f"{grid.tune_root}/{experiment}"
    # the driver's tracker (for the summary run) resolves the W&B mode once (auto, an unreachable server); the
    # collector's tracker starts in the mode it settled on, so a fallback is reported once
    tracker = make_tracker(grid.wandb.mode, grid.wandb.project, grid.wandb.entity, grid.name, grid.folder,
                           _wandb_config(grid, loaded, calibrated.baseline), grid.wandb.feature_maps)
    context = _context(grid, plan, data, loaded, calibrated.baseline, tracker.mode)
    if restore:
        log.info("resuming from Tune's state in %s (%d points already in results.csv)", path, len(done))
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(grid, plan, context, trainable, experiment)
    results = tuner.fit()
    failed = sorted(TrialId(r.config["layer"], r.config["criterion"]).key for r in results if r.error)
    stats = ray.get(board.stats.remote())  # after every record() the collector sent (same caller)
    ray.kill(board)
    return TrialsOutcome(failed, tracker, stats)


def _new_tuner(grid: Grid, plan: TrialPlan, context: Context, trainable: Any, experiment: str) -> tune.Tuner:
    layers = list(dict.fromkeys(t.layer for t in plan.trials))
    space = {"layer": tune.grid_search(layers), "criterion": tune.grid_search(list(plan.criteria)),
             "target": plan.target}
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=grid.resources.max_concurrent, reuse_actors=True,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=experiment, storage_path=grid.tune_root, verbose=0,
            failure_config=tune.FailureConfig(max_failures=grid.sweep.retries),
            callbacks=[Collector(context), QuietProgress()]))
