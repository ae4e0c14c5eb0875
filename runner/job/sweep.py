"""The main job (DESIGN §2, §7): grid -> checkpoint -> data -> rankings -> Ray Tune trials -> results, plots,
report, W&B summary.

Everything the user gave is validated before Ray starts. The driver loads (or trains) the checkpoint once,
loads the data once, ranks every (layer, criterion) in one calibration pass, and hands all of it to the trials
once through the object store.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.checkpoint import Checkpoint
from runner.config import Grid, load_grid
from runner.errors import InputError
from runner.inputs import checkpoints
from runner.inputs.data import Dataset, check_labels, load_data, read_npz
from runner.inputs.train import ensure_checkpoint
from runner.inputs.trials import TrialPlan, plan_trials
from runner.job.calibration import Calibrated, calibrate
from runner.job.folder import check_folder, folder_lock, next_experiment, resume_check, write_config
from runner.job.ray_env import check_reachable, cluster_address, set_ray_env
from runner.job.timeline import Timeline
from runner.outputs import report
from runner.outputs.results import read_rows
from runner.outputs.tracking import Tracker
from runner.provenance import versions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    grid: str
    output: str | None = None
    resume: bool = False
    wandb_mode: str | None = None
    address: str | None = None
    dry_run: bool = False
    overrides: tuple[str, ...] = ()


@dataclass
class Outcome:
    folder: Path
    points: int
    expected: int
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    measured: int = 0  # points measured in this run (a resumed sweep measures only the missing ones)

    @property
    def interrupted(self) -> bool:
        """Points missing with no trial failed: the sweep was stopped (Ctrl-C) and can be resumed."""
        return self.points < self.expected and not self.failed


def run_sweep(opts: Options) -> Outcome:
    """The job, start to end: check every input, then calibrate on the driver, run the trials on Ray, report."""
    started, timeline = time.time(), Timeline()
    timeline.mark("imports")
    grid, plan = prepare(opts)
    # every input checked before anything is created or started: folder, checkpoint, the user's data files
    check_folder(grid, opts.resume)
    existing = checkpoints.existing(grid)
    if opts.resume and existing is not None:
        resume_check(grid, plan, existing.sha256)
    address = cluster_address(opts.address)
    if address:
        check_reachable(address)
    given = None if grid.data.dataset == "synthetic" else load_data(grid.data, grid.model.num_classes, grid.seed)
    timeline.mark("input checks")
    with folder_lock(grid.folder), ThreadPoolExecutor(1) as pool:
        check_folder(grid, opts.resume)  # again, now that no other sweep can be writing there
        if existing is None:  # training is long: in this thread, before Ray, so that Ctrl-C stops it at once
            given = given or load_data(grid.data, grid.model.num_classes, grid.seed)
            existing = ensure_checkpoint(grid, given)
        # the driver's own work (data, baseline, rankings) runs while Ray starts
        ready = pool.submit(_calibrated, grid, plan, given, existing, timeline)
        set_ray_env(address)
        from runner.job import cluster, tuner  # import Ray: only once the grid is known to be good

        with cluster.ray_session(address, grid.resources.ray_dashboard):
            timeline.mark("ray start")
            data, calibrated = ready.result()
            experiment, restore = _experiment(grid, plan, existing, opts.resume)
            trials = tuner.run_trials(grid, plan, data, existing, calibrated, experiment, restore)
            timeline.mark("trials end")
            # plots, report and the W&B summary are made while Ray stops
            reported = pool.submit(finish, grid, plan, data, existing, calibrated.baseline, trials.failed,
                                   trials.tracker)
        timeline.mark("ray stop")
        rows = reported.result()
    if trials.board.first:
        timeline.mark("first point", trials.board.first)
        timeline.mark("last point", trials.board.last)
    timeline.mark("report")
    timeline.log()
    return Outcome(grid.folder, len(rows), plan.points, trials.failed, time.time() - started, trials.board.measured)


def prepare(opts: Options) -> tuple[Grid, TrialPlan]:
    """Load, override, validate and plan: every input check that needs no data and no Ray."""
    grid = load_grid(opts.grid, list(opts.overrides))
    if opts.output:
        grid = grid.model_copy(update={"output": str(Path(opts.output).resolve())})
    if opts.wandb_mode:
        grid = grid.model_copy(update={"wandb": grid.wandb.model_copy(update={"mode": opts.wandb_mode})})
    try:
        return grid, plan_trials(grid)
    except InputError as e:
        raise e.at(opts.grid)


def dry_run(opts: Options) -> list[str]:
    """What the sweep would do, computing nothing: the grid, and the checkpoint and data files checked."""
    grid, plan = prepare(opts)
    loaded = checkpoints.existing(grid)
    if loaded is not None:
        state = f"sha256 {loaded.sha256[:12]}, trained on {loaded.meta.get('dataset')} to " \
                f"{loaded.meta.get('test_accuracy', float('nan')):.2f}%"
    else:
        state = "missing: it will be trained first"
    if grid.data.dataset == "npz":  # files the user gave: check them now (the others are generated or downloaded)
        sizes = []
        for key in ("train", "test"):
            part = read_npz(getattr(grid.data, key), f"data.{key}")[0]
            check_labels(part, grid.model.num_classes, f"data.{key}")
            sizes.append(len(part))
        data = f"npz, {sizes[0]:,} train and {sizes[1]:,} test images"
    else:
        data = grid.data.dataset
    arch = grid.model.arch + (f" width {grid.model.width:g}" if grid.model.arch == "resnet18" else "")
    head = [f"sweep {grid.name}: {arch}, data {data}, output {grid.folder}",
            f"checkpoint {grid.checkpoint.path} ({state})"]
    return head + plan.describe()


def _calibrated(grid: Grid, plan: TrialPlan, given: Dataset | None, loaded: Checkpoint, timeline: Timeline
                ) -> tuple[Dataset, Calibrated]:
    """The data (unless already loaded: synthetic data is a pure function of the grid, nothing to validate
    first), checked against the checkpoint, then the baseline and every ranking; W&B's slow import too."""
    if grid.wandb.mode != "disabled":
        import wandb  # noqa: F401
    data = given or load_data(grid.data, grid.model.num_classes, grid.seed)
    ensure_checkpoint(grid, data, loaded)
    timeline.mark("data")
    calibrated = calibrate(grid, plan, data, loaded)
    timeline.mark("calibration")
    return data, calibrated


def _experiment(grid: Grid, plan: TrialPlan, loaded: Checkpoint, resume: bool) -> tuple[str, bool]:
    """The Tune experiment to run in, and whether to restore it from Tune's state (config.yaml written when new)."""
    from runner.job.tuner import can_restore  # imports Ray

    if resume:
        saved, adds = resume_check(grid, plan, loaded.sha256)
        experiment = saved.get("tune_experiment", "tune")
        if not adds and can_restore(f"{grid.tune_root}/{experiment}"):
            return experiment, True
        log.info("resuming with a new Tune experiment: %s", "the grid adds points" if adds else
                 "Tune's state of the first run was not saved")  # finished points are skipped all the same
    experiment = next_experiment(grid)
    write_config(grid, plan, loaded, experiment)
    return experiment, False


def finish(grid: Grid, plan: TrialPlan, data: Dataset, loaded: Checkpoint, baseline: float, failed: list[str],
           tracker: Tracker) -> list[dict[str, Any]]:
    """Plots, report.md and the W&B summary run, from results.csv; closes the tracker."""
    order = {c.name: i for i, c in enumerate(plan.convs)}
    rows = sorted(read_rows(grid.folder / "results.csv"), key=lambda r: (order[r["layer"]], r["criterion"], r["k"]))
    plots = report.write_plots(rows, baseline, grid.folder)
    path = report.write_report(rows, _report_meta(grid, plan, data, loaded, baseline, tracker.mode), failed,
                               grid.folder, plan.points)
    with closing(tracker):
        tracker.summary(rows, baseline, plots, failed)
    log.info("wrote %s, %s and %s", grid.folder / "results.csv", path, grid.folder / "plots")
    return rows


def _report_meta(grid: Grid, plan: TrialPlan, data: Dataset, loaded: Checkpoint, baseline: float,
                 wandb_mode: str) -> report.ReportMeta:
    runs = grid.folder / "wandb"
    wandb_where = {"disabled": "off",
                   "offline": f"offline runs in {runs} (upload: `wandb sync {runs}/offline-run-*`)",
                   "online": f"project {grid.wandb.project}, group {grid.name}"}[wandb_mode]
    calibration = f"{len(data.calibration):,} held-out training images" if grid.sweep.calibration == "holdout" \
        else "the test images themselves (the seed's leaky choice)"
    return report.ReportMeta(
        name=grid.name, baseline=baseline, eval_images=len(data.test), dataset=data.name, calibration=calibration,
        arch=grid.model.arch, width=grid.model.width, target=plan.target, checkpoint=loaded.path,
        checkpoint_sha256=loaded.sha256, trained_accuracy=f"{loaded.meta.get('test_accuracy', 0):.2f}%",
        versions=versions(), wandb=wandb_where)
