"""Ray and Ray Tune: start or join Ray, run one trial per (layer, criterion), resume from Tune's state.

Imported only once the inputs are known to be good (it imports Ray, which reads environment settings at
import time: see `runner.sweep.RAY_ENV`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from runner.sweep import RAY_ENV

for _key, _value in RAY_ENV.items():  # (runner.sweep.set_ray_env adds the loopback setting for a local Ray)
    os.environ.setdefault(_key, _value)

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.progress_reporter import TrialProgressCallback  # noqa: E402

from model.checkpoint import Checkpoint  # noqa: E402
from runner.collector import Collector, Context  # noqa: E402
from runner.config import Grid  # noqa: E402
from runner.errors import InputError  # noqa: E402
from runner.data import Dataset  # noqa: E402
from runner.plan import Plan  # noqa: E402
from runner.results import read_rows  # noqa: E402
from runner.tracking import Tracker, make_tracker  # noqa: E402
from runner.trial import Shared, board_actor, run_trial  # noqa: E402

log = logging.getLogger(__name__)

@contextmanager
def ray_session(address: str | None, dashboard: bool = False) -> Iterator[None]:
    """Ray for the block: joins the cluster at `address`, or starts a local Ray on 127.0.0.1, with no dashboard
    unless asked for (and stops it afterwards). An already running Ray (tests) is used as it is."""
    started = start_ray(address, dashboard)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def start_ray(address: str | None, dashboard: bool = False) -> bool:
    """Returns whether this call started (or joined) Ray, and so should shut it down."""
    if ray.is_initialized():
        return False
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    if address:
        ray.init(address=address, **quiet)
        log.info("joined the Ray cluster at %s: %s", address, _resources())
    else:
        board = dict(include_dashboard=True, dashboard_host="127.0.0.1") if dashboard else dict(include_dashboard=False)
        try:
            # "local": a new Ray of our own, never one that `ray start` (or a test cluster) left registered in
            # /tmp/ray/ray_current_cluster, which a bare ray.init() would silently join
            context = ray.init(address="local", **board, **quiet)
        except Exception as e:
            if dashboard and "missing packages" in str(e):
                raise InputError("resources.ray_dashboard", True, "Ray's dashboard needs packages that are not "
                                 "installed", "false, or true with ray[default] installed",
                                 "pip install 'ray[default]', or set resources.ray_dashboard: false") from None
            raise
        where = f"dashboard at http://{context.dashboard_url}" if dashboard else "no dashboard"
        log.info("started a local Ray on 127.0.0.1 (%s): %s", where, _resources())
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # trial errors are reported by the collector
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    return True


def _resources() -> str:
    r = ray.cluster_resources()
    return f"{len(ray.nodes())} node(s), {r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} GPUs"


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


def _shared(grid: Grid, plan: Plan, data: Dataset, loaded: Checkpoint, rankings: dict) -> Shared:
    cache = None if grid.resources.cache_gb == "auto" else int(grid.resources.cache_gb * 2**30)
    return Shared(arch=grid.model.arch, width=grid.model.width, num_classes=grid.model.num_classes,
                  state_dict=loaded.model.state_dict(), mean=tuple(loaded.meta["mean"]),
                  std=tuple(loaded.meta["std"]), eval_images=data.test, convs=plan.table, rankings=rankings,
                  ks={(t.layer, t.criterion): t.ks for t in plan.trials}, board=board_name(grid),
                  batch_size=grid.sweep.batch_size, cache_bytes=cache, feature_maps=True)


def _context(grid: Grid, plan: Plan, data: Dataset, loaded: Checkpoint, baseline: float) -> Context:
    from runner.sweep import figure_ks

    return Context(
        folder=str(grid.folder), sweep=grid.name, baseline=baseline, checkpoint_sha256=loaded.sha256,
        eval_images=len(data.test), wandb_mode=grid.wandb.mode, wandb_project=grid.wandb.project,
        wandb_entity=grid.wandb.entity, wandb_config={**grid.as_dict(), "checkpoint_sha256": loaded.sha256,
                                                      "baseline_accuracy": baseline},
        feature_maps=grid.wandb.feature_maps,
        figure_ks={t.key: figure_ks(t.ks, grid.sweep.feature_map_points) for t in plan.trials},
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
    tracker: Tracker  # the tracker that logged them (for the summary run)
    measured: int  # points the trials measured in this run, repeats included


def can_restore(path: str) -> bool:
    if "://" not in path and not Path(path).is_dir():
        return False
    return tune.Tuner.can_restore(path)


def run_trials(grid: Grid, plan: Plan, data: Dataset, loaded: Checkpoint, baseline: float, rankings: dict,
               experiment: str, restore: bool) -> TrialsOutcome:
    """Run (or resume) every trial, inside `ray_session`."""
    Collector.current = None
    done = [(r["layer"], r["criterion"], r["k"]) for r in read_rows(grid.folder / "results.csv")]
    board = board_actor(board_name(grid), done)  # kept alive while the trials run
    shared = _shared(grid, plan, data, loaded, rankings)
    trainable = tune.with_resources(tune.with_parameters(run_trial, shared=shared), trial_resources(grid))
    path = f"{grid.tune_root}/{experiment}"
    if restore:
        log.info("resuming from Tune's state in %s (%d points already in results.csv)", path, len(done))
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(grid, plan, loaded, data, baseline, trainable, experiment)
    results = tuner.fit()
    failed = sorted(f"{r.config['layer']}/{r.config['criterion']}" for r in results if r.error)
    ray.kill(board)
    if Collector.current is not None:
        return TrialsOutcome(failed, Collector.current.tracker, Collector.current.measured)
    c = _context(grid, plan, data, loaded, baseline)
    return TrialsOutcome(failed, make_tracker(c.wandb_mode, c.wandb_project, c.wandb_entity, c.sweep, grid.folder,
                                              c.wandb_config, c.feature_maps), 0)


def _new_tuner(grid: Grid, plan: Plan, loaded: Checkpoint, data: Dataset, baseline: float, trainable: Any,
               experiment: str) -> tune.Tuner:
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
            callbacks=[Collector(_context(grid, plan, data, loaded, baseline)), QuietProgress()]))

