"""The main job (docs/design.md#the-jobs-stories): grid -> checkpoint -> data -> rankings -> Ray Tune trials -> results, plots,
report, W&B summary.

Everything the user gave is validated before Ray starts, the checkpoint's calibration hold-out included. The
driver loads (or trains) the checkpoint once, loads the data once, ranks every (layer, criterion) in one
calibration pass (or reads the rankings back from rankings.json on --resume), and hands all of it to the trials
once through the object store.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from model.checkpoint import Checkpoint
from model.convs import ConvSite
from runner.basics import short
from runner.config import Grid, load_grid
from runner.engine.criteria import CRITERIA
from runner.errors import InputError, plural
from runner.inputs import checkpoints
from runner.inputs.data import (Dataset, Holdout, check_order, checked_shape, class_words, folder_labels, load_data,
                                planned_holdout, read_npz)
from runner.inputs.train import SweepCheckpoint, check_trained_on
from runner.inputs.trials import TrialPlan, plan_trials
from runner.job.calibration import Calibrated, calibrate
from runner.job.folder import check_folder, folder_lock, next_experiment, resume_check, sweep_id, write_config
from runner.job.options import Options
from runner.job.ray_env import check_reachable, cluster_address, set_ray_env
from runner.job.timeline import Timeline
from runner.outputs import figures, report
from runner.outputs.results import read_rows
from runner.outputs.tracking import SUMMARY_RUN, TRAIN_RUN, RunSpec, Tracker, Tracking, model_artifact
from runner.outputs.wandb_tracker import make_tracker, preload
from runner.planning.units import plan_criterion
from runner.provenance import versions

log = logging.getLogger(__name__)

RESULT_FILES = ("results.csv", "rankings.json", "report.md", "config.yaml")  # + plots: the sweep-results artifact


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
    with blamed(opts):
        return _run(opts)


def _run(opts: Options) -> Outcome:
    started, timeline = time.time(), Timeline()
    timeline.mark("imports")
    grid, plan = prepare(opts)
    # every input checked before anything is created or started: folder, checkpoint, the user's data files
    check_folder(grid, opts.resume)
    unlogged = _unlogged(grid, opts.resume)
    checkpoint = SweepCheckpoint.open(grid)
    if opts.resume and checkpoint.loaded is not None:
        resume_check(grid, plan, checkpoint.loaded.sha256)
    address = cluster_address(opts.address)
    if address:
        check_reachable(address)
    # sizes and classes first, without decoding (npz: load_data reads the arrays and checks them anyway)
    shape = checked_shape(grid.data, grid.model.num_classes) if grid.data.dataset != "npz" else None
    # the training images are kept only when the checkpoint is to be trained first
    given = None if grid.data.dataset == "synthetic" else load_data(grid.data, grid.model.num_classes, grid.seed,
                                                                     training=checkpoint.loaded is None,
                                                                     scored=grid.plan.score_on == "test")
    checkpoint.check_holdout(given.holdout if given else planned_holdout(grid.data, grid.seed))
    if checkpoint.loaded is not None:
        check_trained_on(grid, checkpoint.loaded, grid.data.dataset,
                         given.classes if given else shape.names(grid.model.num_classes))
    timeline.mark("input checks")
    with ThreadPoolExecutor(1) as pool, ExitStack() as held:
        # the driver's own work (data, rankings) runs while Ray starts
        ready = pool.submit(_calibrated, grid, plan, given, checkpoint, opts.resume, timeline) \
            if checkpoint.loaded is not None else None
        set_ray_env(address)
        from runner.job import cluster, tuner  # import Ray: only once the grid is known to be good

        # Ray first: what every trial asks for is checked against the cluster before the output folder is made
        with cluster.ray_session(address, grid.resources.ray_dashboard, grid.resources,
                                 len(plan.trials)) as ray_line:
            held.enter_context(folder_lock(grid.folder))  # until the report is written, after Ray stops
            check_folder(grid, opts.resume)  # again, now that no other sweep can be writing there
            if ray_line:
                log.info("%s", ray_line)
            timeline.mark("ray start")
            tracking = _tracking(grid, sweep_id(grid, opts.resume))
            tracker = held.enter_context(closing(make_tracker(tracking)))
            if ready is None:  # training is long: in this thread, so that Ctrl-C stops it at once
                given = given or load_data(grid.data, grid.model.num_classes, grid.seed)
                checkpoint.ready(given, tracker.train_log(RunSpec(TRAIN_RUN, "train")))
                ready = pool.submit(_calibrated, grid, plan, given, checkpoint, opts.resume, timeline)
            data, calibrated = ready.result()
            existing, holdout = checkpoint.loaded, checkpoint.holdout
            tracking = replace(tracking, config={**tracking.config, "data_subsets": data.subsets()})
            log.info("%s", calibrated.said)
            calibrated.save(grid.folder)
            if holdout == "unknown":
                log.warning("checkpoint %s does not record which training images it was trained without: the "
                            "calibration hold-out cannot be checked (the report says so)", existing.path)
            experiment, restore = _experiment(grid, plan, existing, opts.resume, tracking.sweep_id)
            held.enter_context(cluster.heap_frozen())  # until Ray has stopped (see there)
            trials = tuner.run_trials(grid, plan, data, existing, calibrated, experiment, restore, tracker,
                                      tracking)
            timeline.mark("trials end")
            # plots, report and the W&B summary are made while Ray stops
            reported = pool.submit(finish, grid, plan, data, existing, holdout, trials.failed, tracker, unlogged)
        timeline.mark("ray stop")
        reported.result()
    rows = read_rows(grid.folder / "results.csv", skipped=True)  # stop_drop's skipped points are done too
    if trials.board.first:
        timeline.mark("first point", trials.board.first)
        timeline.mark("last point", trials.board.last)
    timeline.mark("report")
    timeline.log()
    return Outcome(grid.folder, len(rows), plan.points, trials.failed, time.time() - started, trials.board.measured)


GRID_KEYS = ("name", "seed", "model", "data", "checkpoint", "sweep", "resources", "wandb", "plan", "validate")


@contextmanager
def blamed(opts: Options, on_file: bool = False) -> Iterator[None]:
    """An input error about a grid key given by a --set flag names that flag. Otherwise errors of the plan
    (`on_file`) and of resources found once Ray runs name the grid file (or the Python API's grid); the others
    name their own field alone, as they are."""
    try:
        yield
    except InputError as e:
        if e.source is None and e.field.partition(".")[0].partition("[")[0] in GRID_KEYS:
            for item in opts.overrides:
                key = item.partition("=")[0]
                if e.field == key or e.field.startswith((key + ".", key + "[")):
                    e.source = f"--set {item}"
            if on_file or e.field.startswith("resources"):
                e.at(str(opts.grid) if not isinstance(opts.grid, Grid) else "sweep(grid)")
        raise


def _tracking(grid: Grid, sweep: str) -> Tracking:
    return Tracking(grid.wandb.mode, grid.wandb.project, grid.wandb.entity, grid.name, grid.folder,
                    grid.as_dict(), grid.wandb.feature_maps, sweep)


def prepare(opts: Options) -> tuple[Grid, TrialPlan]:
    """Load, override, validate and plan: every input check that needs no data and no Ray."""
    grid = opts.grid if isinstance(opts.grid, Grid) else load_grid(opts.grid, list(opts.overrides))
    if opts.output:
        grid = grid.model_copy(update={"output": str(Path(opts.output).resolve())})
    if opts.wandb_mode:
        grid = grid.model_copy(update={"wandb": grid.wandb.model_copy(update={"mode": opts.wandb_mode})})
    with blamed(opts, on_file=True):
        return grid, plan_trials(grid)


def dry_run(opts: Options, folder: bool = True) -> list[str]:
    """What the sweep would do, computing nothing: every check the run makes on its inputs (the grid, the output
    folder against --resume when `folder`, a resumed sweep's recorded grid, the data's sizes and classes, the
    checkpoint against the model, the data and the calibration hold-out), then the plan."""
    with blamed(opts):
        return _dry_run(opts, folder)


def _dry_run(opts: Options, folder: bool) -> list[str]:
    grid, plan = prepare(opts)
    if folder:
        check_folder(grid, opts.resume)
    loaded = checkpoints.existing(grid)
    if opts.resume and folder and loaded is not None:
        resume_check(grid, plan, loaded.sha256)
    n = grid.model.num_classes
    shape = checked_shape(grid.data, n)
    scored = grid.plan.score_on == "test"
    if grid.data.dataset == "npz":  # the user's files: subsets in their order are refused now, as the run would
        train, test = (read_npz(getattr(grid.data, key), f"data.{key}")[0] for key in ("train", "test"))
        check_order(grid.data, test.labels, train.labels, grid.seed, scored)
    elif grid.data.dataset == "imagefolder" and grid.data.resolved_order == "given":  # labels from file names
        train_labels, test_labels = folder_labels(grid.data)
        check_order(grid.data, test_labels, train_labels, grid.seed, scored)
    if loaded is not None:
        checkpoints.check_holdout(grid, loaded, Holdout.of(shape.train, grid.data.calibration_size, grid.seed))
        check_trained_on(grid, loaded, grid.data.dataset, shape.names(n))
        state = f"sha256 {short(loaded.sha256)}, trained on {loaded.meta.get('dataset')} to " \
                f"{loaded.meta.get('test_accuracy', float('nan')):.2f}%"
    else:
        state = "missing: it will be trained first"
    warning = report.near_chance(loaded.meta.get("test_accuracy", float("nan")), n) if loaded else None
    evaluated = f", {grid.data.eval_size:,} evaluated" if grid.data.eval_size else ""
    data = f"{grid.data.dataset}, {shape.train:,} train and {shape.test:,} test images{evaluated}, " \
           f"{plural(len(shape.names(n)), 'class', 'classes')}, subsets in data.order {grid.data.resolved_order}"
    arch = grid.model.arch + (f" width {grid.model.width:g}" if grid.model.arch == "resnet18" else "")
    head = [f"sweep {grid.name}: {arch}, data {data}, output {grid.folder}",
            f"checkpoint {grid.checkpoint.path} ({state})"] + ([f"warning: {warning}"] if warning else [])
    return head + plan.describe()


def _calibrated(grid: Grid, plan: TrialPlan, given: Dataset | None, checkpoint: SweepCheckpoint, resume: bool,
                timeline: Timeline) -> tuple[Dataset, Calibrated]:
    """The data (unless already loaded: synthetic data is a pure function of the grid, nothing to validate
    first), checked against the checkpoint's classes, then every ranking
    (read back from rankings.json on --resume), then the slow imports of later steps: W&B's (the main thread
    makes its tracker once Ray is up) and pyplot's (the plots at the end, after the last point). They come
    last: Ray starts in about the time the data and the rankings take, so they delay no point."""
    data = given or load_data(grid.data, grid.model.num_classes, grid.seed, training=False)
    loaded = checkpoint.ready(data)
    timeline.mark("data")
    calibrated = calibrate(grid, plan, data, loaded, resume)
    timeline.mark("calibration")
    preload(grid.wandb.mode)
    figures.pyplot()
    return data, calibrated


def _experiment(grid: Grid, plan: TrialPlan, loaded: Checkpoint, resume: bool, sweep: str) -> tuple[str, bool]:
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
    write_config(grid, plan, loaded, experiment, sweep)
    return experiment, False


def _unlogged(grid: Grid, resume: bool) -> int:
    """Points in results.csv that no W&B run holds: those of a resumed sweep whose earlier runs had W&B off
    (W&B, offline or online, leaves its run folders in <output>/<name>/wandb)."""
    if not resume or any((grid.folder / "wandb").glob("*run-*")):
        return 0
    return len(read_rows(grid.folder / "results.csv"))


def finish(grid: Grid, plan: TrialPlan, data: Dataset, loaded: Checkpoint, holdout: str, failed: list[str],
           tracker: Tracker, unlogged: int = 0) -> list[dict[str, Any]]:
    """Plots, report.md and the W&B summary run (with the sweep-results artifact), from results.csv (and
    rankings.json); closes the tracker. `unlogged`: points measured before --resume with W&B off."""
    order = {c.name: i for i, c in enumerate(plan.convs)}
    rows = sorted(read_rows(grid.folder / "results.csv"),
                  key=lambda r: (order[r["layer"]], r["criterion"], r["k"], r["repeat"]))
    baseline = report.reference_baseline(rows)
    warning = report.near_chance(baseline, len(data.classes))
    if warning:
        log.warning("%s", warning)
    plots = report.write_plots(rows, baseline, grid.folder)
    meta = _report_meta(grid, plan, data, loaded, holdout, tracker.mode, unlogged)
    path = report.write_report(rows, meta, failed, grid.folder, plan.points)
    outputs = [grid.folder / name for name in RESULT_FILES] + sorted(plots.values())
    with closing(tracker):
        tracker.summary(RunSpec(SUMMARY_RUN, "summary", {"checkpoint_sha256": loaded.sha256,
                                                         "baseline_accuracy": baseline,
                                                         "data_subsets": data.subsets()},
                                uses=model_artifact(loaded.path, loaded.sha256)), rows, baseline, plots, failed,
                        outputs, {"near_chance": warning is not None, "chance_accuracy": 100 / len(data.classes),
                                  **({"warning": warning} if warning else {})})
    log.info("wrote %s, %s and %s", grid.folder / "results.csv", path, grid.folder / "plots")
    return rows


def role_of(conv: ConvSite) -> str:
    """stem | conv1 | conv2 | shortcut, read from the graph and the conv's name (ResNet's names; other convs get
    their own last name part)."""
    if conv.shortcut:
        return "shortcut"
    return "stem" if conv.index == 0 else conv.name.rsplit(".", 1)[-1]


def _report_meta(grid: Grid, plan: TrialPlan, data: Dataset, loaded: Checkpoint, holdout: str,
                 wandb_mode: str, unlogged: int = 0) -> report.ReportMeta:
    wandb_where = wandb_words(grid, wandb_mode, unlogged)
    calibration = f"{len(data.calibration):,} held-out training images ({class_words(data.calibration.labels)})" \
        if grid.sweep.calibration == "holdout" else "the test images themselves (the seed's leaky choice)"
    return report.ReportMeta(
        name=grid.name, eval_images=len(data.test), dataset=data.name, calibration=calibration,
        eval_classes=data.eval_words(),
        arch=grid.model.arch, width=grid.model.width, target=plan.target, checkpoint=loaded.path,
        checkpoint_sha256=loaded.sha256, trained_accuracy=f"{loaded.meta.get('test_accuracy', 0):.2f}%",
        versions=versions(), wandb=wandb_where, holdout=holdout, roles={c.name: role_of(c) for c in plan.layers},
        criteria=plan.criteria, random_repeats=grid.sweep.random_repeats, random_seed=grid.sweep.random_seed,
        seed_procedure=_seed_procedure(grid, loaded), order_by=_plan_criterion(grid), classes=len(data.classes))


def wandb_words(grid: Grid, mode: str, unlogged: int = 0) -> str:
    """Where the sweep's W&B runs are, for the report; `unlogged` points (measured before --resume with W&B
    off) are in no W&B run."""
    runs = grid.folder / "wandb"
    words = {"disabled": "off",
             "offline": f"offline runs in {runs} (upload: `wandb sync {runs}/offline-run-*`)",
             "online": f"project {grid.wandb.project}, group {grid.name}"}[mode]
    if unlogged and mode != "disabled":
        words += (f"; they hold what was measured after --resume and the summary run, not the "
                  f"{plural(unlogged, 'point')} measured before with W&B off")
    return words


def _plan_criterion(grid: Grid) -> str | None:
    """The criterion `prune` would plan with (the report sorts its layer table by it), None when none can."""
    try:
        return plan_criterion(grid.plan.criterion, grid.sweep.criteria, {n: CRITERIA[n].draws for n in CRITERIA})
    except InputError:
        return None


def _seed_procedure(grid: Grid, loaded: Checkpoint) -> str | None:
    """How far `criterion: seed` is from the report's procedure (None when it is that procedure, or not asked)."""
    if "seed" not in grid.sweep.criteria:
        return None
    gaps = []
    if grid.sweep.calibration != "test":
        gaps.append("it ranks on held-out training images, while the report ranked on the test set "
                    "(sweep.calibration: test)")
    if tuple(loaded.meta.get("mean", ())) != (0.5,) * 3 or tuple(loaded.meta.get("std", ())) != (0.5,) * 3:
        gaps.append("the checkpoint is not normalised with mean = std = 0.5 as the report's was (recipe: seed)")
    return "; ".join(gaps) or None
