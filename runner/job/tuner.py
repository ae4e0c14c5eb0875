"""Ray Tune: one trial per (layer, criterion), run new or resumed from Tune's state (inside
`runner.job.cluster.ray_session`)."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.progress_reporter import TrialProgressCallback
from ray.tune.schedulers import FIFOScheduler

from model.checkpoint import Checkpoint
from runner.basics import short
from runner.config import Grid
from runner.inputs.data import Dataset
from runner.inputs.models import spec_of
from runner.inputs.trials import TrialPlan
from runner.job.calibration import Calibrated
from runner.job.collector import Collector, Context, measured
from runner.job.resources import trial_request
from runner.job.board import BoardStats, board_actor, kill_board
from runner.job.trial import Shared, run_trial
from runner.outputs.results import TrialId, key_of, read_rows
from runner.outputs.tracking import RunSpec, Tracker, Tracking, model_artifact

log = logging.getLogger(__name__)


def trial_resources(grid: Grid) -> dict[str, float]:
    return trial_request(grid.resources, ray.cluster_resources().get("GPU", 0))


def trial_name(trial: Any) -> str:
    return f"{trial.config['layer']}-{trial.config['criterion']}"


def board_name(grid: Grid) -> str:
    return "prune-sweep-progress-" + short(hashlib.sha1(str(grid.folder).encode()).hexdigest())


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


def stage_of(name: str) -> int:
    """The stage a conv belongs to, from its module path: n for layer<n>.*, 0 otherwise (the stem, or a network
    without ResNet's stage names)."""
    found = re.fullmatch(r"layer(\d+)", name.split(".")[0])
    return int(found[1]) if found else 0


def trial_runs(plan: TrialPlan, loaded: Checkpoint) -> dict[str, RunSpec]:
    """Each trial's W&B run: named layer/criterion, with the layer's numbers in its config (for W&B's runs
    table and parallel coordinates) and its criterion, target and unit as tags."""
    index = {c.name: i for i, c in enumerate(plan.convs)}
    uses = model_artifact(loaded.path, loaded.sha256)
    runs = {}
    for t in plan.trials:
        conv = plan.table[t.layer]
        macs = (conv.in_channels // conv.groups * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
                * conv.out_hw[0] * conv.out_hw[1])
        config = {"layer": t.layer, "criterion": t.criterion, "target": t.target, "unit": plan.unit,
                  "layer_index": index[t.layer], "stage": stage_of(t.layer), "channels": t.channels, "macs": macs,
                  "checkpoint_sha256": loaded.sha256}
        runs[t.id.key] = RunSpec(t.id.key, "prune-eval", config,
                                 (f"criterion:{t.criterion}", f"target:{t.target}", f"unit:{plan.unit}"), uses)
    return runs


def _context(grid: Grid, plan: TrialPlan, data: Dataset, loaded: Checkpoint, tracker: Tracker,
             tracking: Tracking) -> Context:
    return Context(
        folder=str(grid.folder), sweep=grid.name, checkpoint_sha256=loaded.sha256,
        eval_images=len(data.test), tracking=replace(tracking, mode=tracker.mode),
        runs=trial_runs(plan, loaded),
        figure_ks={t.id.key: t.figure_ks(grid.sweep.feature_map_points) for t in plan.trials},
        total_points=plan.points, board=board_name(grid))


class QuietProgress(TrialProgressCallback):
    """Tune's console reporter, silenced: Tune adds one unless the callbacks hold one, and a restored
    experiment's copy prints "Trial ... completed" for every finished trial whatever the verbosity. The
    collector reports progress instead."""

    def _print(self, msg: str) -> None:
        log.debug("tune: %s", msg)


class StartedStay(FIFOScheduler):
    """Tune's FIFO order, except that a pending trial whose actor Ray has already placed on a node (its worker
    starting there) is left to that actor.

    With reuse_actors, Tune hands an actor that finished its trial the first pending trial, and when that trial's
    own actor was already starting on another node, Tune kills it (TuneController._maybe_reuse_cached_actor,
    "Removing ORIGINAL ACTOR"). Where a trial takes less time than a worker takes to start (short trials, a node
    slower to start), a node's actors were killed one after another as they came up, and the node ran nothing
    (the 3-node test cluster: 1 run in 5, every point on one node). Here the finished actor takes the first
    pending trial that has no actor on a node yet. Reads two of Tune's private fields; should they move, this is
    Tune's own FIFO order (tests/test_resources.py checks that they are there)."""

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        placed = placed_trials(tune_controller)
        for status in (Trial.PENDING, Trial.PAUSED):
            for trial in tune_controller.get_trials():
                if trial.status == status and trial not in placed:
                    return trial
        return None


def placed_trials(controller: Any) -> set:
    """Trials whose actor Ray has placed on a node (starting or started), from Tune's private state. A scheduler
    is handed the controller in a wrapper that warns on the console when a private field is read through it:
    read past it."""
    inner = vars(controller).get("_tune_controller", controller)
    try:
        live = inner._actor_manager._live_actors_to_ray_actors_resources
        return {trial for trial, actor in inner._trial_to_actor.items() if actor in live}
    except AttributeError:
        return set()


@dataclass
class TrialsOutcome:
    failed: list[str]  # trials that failed after their retries
    board: BoardStats  # points measured in this run (repeats included), and when the first and last arrived


def can_restore(path: str) -> bool:
    if "://" not in path and not Path(path).is_dir():
        return False
    return tune.Tuner.can_restore(path)


def run_trials(grid: Grid, plan: TrialPlan, data: Dataset, loaded: Checkpoint, calibrated: Calibrated,
               experiment: str, restore: bool, tracker: Tracker, tracking: Tracking) -> TrialsOutcome:
    """Run (or resume) every trial, inside `ray_session`. The driver's tracker has resolved the W&B mode (auto,
    an unreachable server); the collector's tracker starts in the mode it settled on, so a fallback is reported
    once."""
    done = [key_of(r) for r in read_rows(grid.folder / "results.csv")]
    name = board_name(grid)
    kill_board(name)  # one an earlier driver of this sweep left
    # a resumed sweep's trials ask the board from the start (a new sweep makes one at its first retry); held
    # here: Ray ends an actor nobody holds a handle to
    board = board_actor(name, done) if done else None
    shared = _shared(grid, plan, data, loaded, calibrated.rankings)
    trainable = tune.with_resources(tune.with_parameters(run_trial, shared=shared), trial_resources(grid))
    path = f"{grid.tune_root}/{experiment}"
    context = _context(grid, plan, data, loaded, tracker, tracking)
    if restore:
        log.info("resuming from Tune's state in %s (%d points already in results.csv)", path, len(done))
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(grid, plan, context, trainable, experiment)
    results = tuner.fit()
    failed = sorted(TrialId(r.config["layer"], r.config["criterion"]).key for r in results if r.error)
    kill_board(name)
    del board  # held until here
    return TrialsOutcome(failed, measured(name))


def start_order(units: list[str]) -> list[str]:
    """The swept units (in forward order) in the order Tune makes their trials: the deepest first, then the
    others in forward order. The deepest unit's baseline and first K run through the shortest suffix of the
    network, so the sweep's first point arrives soonest. After it, an early unit's every point runs through most of
    the network: the longest trials start first and the last to start are short, so no long trial is left alone
    on one CPU at the end."""
    return units[-1:] + units[:-1]


def _new_tuner(grid: Grid, plan: TrialPlan, context: Context, trainable: Any, experiment: str) -> tune.Tuner:
    layers = start_order(list(dict.fromkeys(t.layer for t in plan.trials)))
    space = {"layer": tune.grid_search(layers), "criterion": tune.grid_search(list(plan.criteria)),
             "target": plan.target}
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=grid.resources.max_concurrent, reuse_actors=True,
                                    scheduler=StartedStay(),
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=experiment, storage_path=grid.tune_root, verbose=0,
            failure_config=tune.FailureConfig(max_failures=grid.sweep.retries),
            callbacks=[Collector(context), QuietProgress()]))


def tune_table(folder: Path, tune_root: str | None = None, experiments: list[str] | None = None
               ) -> list[dict[str, Any]]:
    """Tune's own record of a sweep: one row per trial of each of its Tune experiments (a resume that adds
    points starts a new one): status, retries, the error file of a failed trial, and the last point it
    reported. Tune keeps only each trial's last result (its per-result loggers are off: every point is in
    results.csv, written as it arrives), so this is the trials' story, not the results."""
    root = tune_root or str(folder)
    if experiments is None:
        experiments = sorted((p.name for p in Path(root).glob("tune*") if p.is_dir()),
                             key=lambda n: (len(n), n)) if "://" not in root else []
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns that the per-result files it looks for are absent
    rows = []
    try:
        for name in experiments:
            path = f"{root}/{name}"
            if not can_restore(path):
                continue
            for t in tune.ExperimentAnalysis(path).trials:
                last = t.last_result or {}
                error = t.run_metadata.error_filename
                rows.append({
                    "experiment": name, "trial_id": t.trial_id, "layer": t.config.get("layer"),
                    "criterion": t.config.get("criterion"), "target": t.config.get("target"), "status": t.status,
                    "failures": t.num_failures, "results": last.get("training_iteration", 0),
                    "last_k": last.get("k"), "last_accuracy": last.get("accuracy"),
                    "seconds": last.get("time_total_s"), "ended": last.get("timestamp"), "node": last.get("node"),
                    "error_file": f"{t.storage.trial_fs_path}/{error}" if error else None})
    finally:
        quiet.setLevel(level)
    return rows
