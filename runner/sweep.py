"""The main job (DESIGN §2, §7): grid -> checkpoint -> data -> rankings -> Ray Tune trials -> results, plots,
report, W&B summary.

Everything the user gave is validated before Ray starts. The driver loads (or trains) the checkpoint once,
loads the data once, ranks every (layer, criterion) in one calibration pass, and hands all of it to the trials
once through the object store.
"""

from __future__ import annotations

import fcntl
from concurrent.futures import ThreadPoolExecutor
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from model import checkpoint as ckpt_io
from model.checkpoint import Checkpoint
from runner.config import Grid, load_grid, parse_grid
from runner.criteria import rank_all
from runner.data import Dataset, check_labels, load_data, read_npz
from runner.device import fast_math, pick_device, uses_channels_last
from runner.engine import EvalSet
from runner.errors import InputError
from runner.evaluate import evaluate
from runner.plan import Plan, make_plan
from runner.provenance import versions
from runner.results import read_rows
from runner.tracking import Tracker
from runner import report, storage
from runner.train import train_checkpoint

log = logging.getLogger(__name__)

TARGET_MEANING = {
    "output": "filter and BN channel removed: the channel is zero after the layer's BN",
    "input": "input channel zeroed in the conv's weights (the seed's operation)",
}
# Ray and Tune read these when imported or started; set before either happens (see README, "Ray").
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",  # no token file in ~/.ray for a local, loopback-only instance
    "RAY_USAGE_STATS_ENABLED": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no JSON/CSV/TensorBoard loggers: results.csv is the record
    "RAY_AIR_NEW_OUTPUT": "0",  # with verbose=0, Tune prints nothing; the collector logs progress instead
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    # Tune's own state: every 60 s is enough, since --resume skips every point already in results.csv (its
    # default, adaptive period spent about 5% of the demo's time writing it)
    "TUNE_GLOBAL_CHECKPOINT_S": "60",
    "WANDB_SILENT": "true",
}

# For a Ray on loopback only: one this process starts itself, or a cluster whose address is 127.0.0.1 (all its
# nodes on this machine). The node address is then 127.0.0.1 and every socket binds to loopback. Never when
# joining a cluster at a real address (--address, or RAY_ADDRESS as `ray job submit` sets it): the driver must
# then present the machine's real address to the cluster.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def cluster_address(flag: str | None) -> str | None:
    """The cluster to join: --address, else RAY_ADDRESS (as `ray job submit` sets it), else none (a local Ray)."""
    return flag or os.environ.get("RAY_ADDRESS") or None


def on_loopback(address: str | None) -> bool:
    """Whether the Ray we start (address None) or join lives on 127.0.0.1 only."""
    if not address:
        return True
    host = address.split("://")[-1].rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def set_ray_env(address: str | None) -> None:
    """Environment Ray reads at import: call before `runner.tuner` (or ray) is imported."""
    for key, value in (RAY_ENV | (LOCAL_RAY_ENV if on_loopback(address) else {})).items():
        os.environ.setdefault(key, value)


def check_reachable(address: str) -> None:
    """A cluster address that nothing answers at is a bad flag (one line, exit 2), not a two-minute hang in
    ray.init. Ray's own forms ("auto", "ray://...") are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except OSError as e:
        raise InputError("--address", address, f"no Ray cluster answers there ({e.strerror or e})",
                         "the address of a running Ray head (host:port, as `ray start --head` prints it)",
                         "start the cluster, fix the address, or leave --address out to run on this machine") from None


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


def prepare(opts: Options) -> tuple[Grid, Plan]:
    """Load, override, validate and plan: every input check that needs no data and no Ray."""
    grid = load_grid(opts.grid, list(opts.overrides))
    if opts.output:
        grid = grid.model_copy(update={"output": str(Path(opts.output).resolve())})
    if opts.wandb_mode:
        grid = grid.model_copy(update={"wandb": grid.wandb.model_copy(update={"mode": opts.wandb_mode})})
    try:
        return grid, make_plan(grid)
    except InputError as e:
        raise e.at(opts.grid)


def dry_run(opts: Options) -> list[str]:
    """What the sweep would do, computing nothing: the grid, and the checkpoint and data files checked."""
    grid, plan = prepare(opts)
    path = grid.checkpoint.path
    loaded = existing_checkpoint(grid)
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
    head = [f"sweep {grid.name}: {grid.model.arch} width {grid.model.width:g}, data {data}, output {grid.folder}",
            f"checkpoint {path} ({state})"]
    return head + plan.describe()


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """One sweep at a time per output folder: a second one is refused (the lock dies with its process)."""
    path = folder / ".lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise InputError("output", str(folder), f"cannot write there ({e.strerror})", "a folder you can write to",
                         "choose another --output, or fix the folder's permissions") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise InputError("output", str(folder), f"another sweep is running in this folder "
                             f"({f.read().strip() or 'unknown process'})", "one sweep per output folder",
                             "wait for it, or give this one another name or --output") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def existing_checkpoint(grid: Grid) -> Checkpoint | None:
    """The checkpoint, loaded and checked, or None when it is missing and the grid can train it."""
    if not Path(grid.checkpoint.path).is_file():
        if grid.checkpoint.train is None:
            raise InputError("checkpoint.path", grid.checkpoint.path, "no such file, and the grid has no "
                             "checkpoint.train section to train it", "an existing checkpoint, or a recipe",
                             "add checkpoint.train ({recipe: standard, epochs: 30}) or fix the path")
        return None
    return ckpt_io.load(grid.checkpoint.path, grid.model.arch, grid.model.width, grid.model.num_classes)


def ensure_checkpoint(grid: Grid, data: Dataset, loaded: Checkpoint | None = None) -> Checkpoint:
    """The shared checkpoint (trained first when it is missing and the grid has a recipe), checked against
    the data it will be evaluated on."""
    loaded = loaded or existing_checkpoint(grid)
    if loaded is None:
        log.info("checkpoint %s is missing: training it first", grid.checkpoint.path)
        train_checkpoint(grid, data)
        loaded = ckpt_io.load(grid.checkpoint.path, grid.model.arch, grid.model.width, grid.model.num_classes)
    trained_on = loaded.meta.get("dataset"), tuple(loaded.meta.get("classes", ()))
    if trained_on != (data.name, data.classes):
        raise InputError("checkpoint.path", grid.checkpoint.path, f"trained on {trained_on[0]} with classes "
                         f"{', '.join(trained_on[1][:3])}..., but the grid evaluates {data.name}",
                         "a checkpoint trained on the grid's dataset", "point checkpoint.path at one, or retrain")
    return loaded


def _identity(grid: Grid, sha: str) -> dict[str, Any]:
    """What makes two runs the same sweep: the measured grid and the checkpoint (not paths, W&B or resources)."""
    d = grid.as_dict()
    return {"checkpoint_sha256": sha, "model": d["model"], "data": {k: v for k, v in d["data"].items()
                                                                    if k not in ("root", "download")},
            "sweep": {k: v for k, v in d["sweep"].items() if k not in ("retries", "batch_size")}, "seed": d["seed"]}


def check_folder(grid: Grid, resume: bool) -> None:
    """A fresh sweep never overwrites results; --resume needs a sweep to resume."""
    results = grid.folder / "results.csv"
    if resume and not (grid.folder / "config.yaml").is_file():
        raise InputError("--resume", str(grid.folder), "there is no sweep to resume in this folder",
                         "a folder where a sweep with this name started", "run without --resume")
    if not resume and results.is_file() and read_rows(results):
        raise InputError("output", str(grid.folder), "this folder already holds results of a sweep",
                         "a new folder, or --resume to continue that sweep",
                         "add --resume, or choose another name or --output")


ADDABLE = {"layers", "include_shortcuts", "k", "criteria"}  # sweep keys a resumed grid may change to add points


def points_of(plan: Plan) -> set[tuple[str, str, int]]:
    return {(t.layer, t.criterion, k) for t in plan.trials for k in t.ks}


def resume_check(grid: Grid, plan: Plan, sha: str) -> tuple[dict[str, Any], bool]:
    """The saved config.yaml, and whether the grid adds points to it. Refuses a changed checkpoint, and a grid
    that changes what the recorded points mean or drops any of them."""
    saved = yaml.safe_load((grid.folder / "config.yaml").read_text(encoding="utf-8"))
    before, now = saved.get("identity", {}), _identity(grid, sha)
    if before == now:
        return saved, False
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    refuse = "restore them, or start a new sweep under another name or --output"
    if "checkpoint_sha256" in changed:
        raise InputError("--resume", str(grid.folder), "the checkpoint changed since this sweep started (sha256 "
                         f"{before.get('checkpoint_sha256', '?')[:12]} then, {sha[:12]} now)",
                         "the checkpoint the sweep started with", refuse)
    swept = sorted(k for k in set(before.get("sweep", {})) | set(now["sweep"])
                   if before.get("sweep", {}).get(k) != now["sweep"].get(k))
    if changed != ["sweep"] or not set(swept) <= ADDABLE:
        what = ", ".join(f"sweep.{k}" for k in swept if k not in ADDABLE) or ", ".join(c for c in changed if c != "sweep")
        raise InputError("--resume", str(grid.folder), f"the grid changed since this sweep started ({what})",
                         "the same grid, or one that only adds layers, K values or criteria", refuse)
    old = parse_grid({k: v for k, v in saved.items() if k not in ("provenance", "identity", "tune_experiment")},
                     str(grid.folder / "config.yaml"))
    lost = points_of(make_plan(old)) - points_of(plan)
    if lost:
        layer, criterion, k = sorted(lost)[0]
        raise InputError("--resume", str(grid.folder), f"the grid drops {len(lost)} recorded points (first: {layer}, "
                         f"{criterion}, K={k})", "a grid that keeps every point and adds others", refuse)
    return saved, True


def write_config(grid: Grid, plan: Plan, loaded: Checkpoint, experiment: str) -> None:
    doc = {**grid.as_dict(), "provenance": {
        "checkpoint_sha256": loaded.sha256, "checkpoint_meta": {k: v for k, v in loaded.meta.items()
                                                                if k not in ("epoch_losses",)},
        "versions": versions(), "started": datetime.now(timezone.utc).isoformat(),
        "trials": len(plan.trials), "points": plan.points}, "identity": _identity(grid, loaded.sha256),
        "tune_experiment": experiment}
    storage.write_text(grid.folder / "config.yaml", yaml.safe_dump(doc, sort_keys=False))


def next_experiment(grid: Grid) -> str:
    """A Tune experiment name not used yet: tune, tune-2, tune-3, ... in the output folder; in a tune_storage
    elsewhere (perhaps a URI, not listed here), one stamped with the time."""
    if grid.resources.tune_storage is not None:
        return "tune-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    folder, n = grid.folder, 1
    while (folder / ("tune" if n == 1 else f"tune-{n}")).exists():
        n += 1
    return "tune" if n == 1 else f"tune-{n}"


@dataclass(frozen=True)
class Calibrated:
    """The network on the driver's device, the eval set, the baseline accuracy and every ranking."""

    model: torch.nn.Module
    evalset: EvalSet
    baseline: float
    rankings: dict


def calibrate(grid: Grid, plan: Plan, data: Dataset, loaded: Checkpoint) -> Calibrated:
    """Baseline accuracy and every ranking (one calibration pass), before any trial starts."""
    device = pick_device()
    model = loaded.model.to(device).eval()
    if uses_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    mean, std = tuple(loaded.meta["mean"]), tuple(loaded.meta["std"])
    bs = grid.sweep.batch_size
    evalset = EvalSet.build(data.test, mean, std, len(data.classes), device, bs)
    with fast_math(device):
        baseline = evaluate(model, evalset.inputs, evalset.labels, len(data.classes)).result().accuracy
    calib = data.calibration if grid.sweep.calibration == "holdout" else data.test
    cal = EvalSet.build(calib, mean, std, len(data.classes), device, bs)
    started = time.time()
    with fast_math(device):
        rankings = rank_all(model, list(plan.layers), list(plan.criteria), plan.target, torch.cat(cal.inputs),
                            torch.cat(cal.labels), bs, grid.seed)
    log.info("baseline accuracy %.2f%% on %d images; %d rankings from one pass over %d %s images (%.1f s)",
             baseline, evalset.count, len(rankings), cal.count, grid.sweep.calibration, time.time() - started)
    return Calibrated(model, evalset, baseline, rankings)


def figure_ks(ks: tuple[int, ...], count: int) -> tuple[int, ...]:
    """A few K spread over the range (first, middle, last for 3)."""
    if count <= 0:
        return ()
    if len(ks) <= count:
        return ks
    idx = sorted({round(i * (len(ks) - 1) / (count - 1)) for i in range(count)}) if count > 1 else [len(ks) - 1]
    return tuple(ks[i] for i in idx)


def _load_data_and_tracker(grid: Grid, given: Dataset | None) -> Dataset:
    """The data (unless already loaded), and W&B's import (a second or two) done off the critical path."""
    if grid.wandb.mode != "disabled":
        import wandb  # noqa: F401
    return given or load_data(grid.data, grid.model.num_classes, grid.seed)


def run_sweep(opts: Options) -> Outcome:
    started = time.time()
    grid, plan = prepare(opts)
    # every input checked before anything is created or started: folder, checkpoint, the user's data files
    check_folder(grid, opts.resume)
    existing = existing_checkpoint(grid)
    if opts.resume and existing is not None:
        resume_check(grid, plan, existing.sha256)
    address = cluster_address(opts.address)
    if address:
        check_reachable(address)
    given = None if grid.data.dataset == "synthetic" else load_data(grid.data, grid.model.num_classes, grid.seed)
    with folder_lock(grid.folder), ThreadPoolExecutor(1) as pool:
        check_folder(grid, opts.resume)  # again, now that no other sweep can be writing there
        # synthetic data generates in a thread while Ray starts (it is a pure function of the grid: nothing
        # to validate); W&B's slow import happens there too
        data_ready = pool.submit(_load_data_and_tracker, grid, given)
        set_ray_env(address)
        from runner import tuner  # imports Ray: only once the grid is known to be good

        with tuner.ray_session(address, grid.resources.ray_dashboard):
            data = data_ready.result()
            loaded = ensure_checkpoint(grid, data, existing)
            restore = None
            if opts.resume:
                saved, adds = resume_check(grid, plan, loaded.sha256)
                experiment = saved.get("tune_experiment", "tune")
                if not adds and tuner.can_restore(f"{grid.tune_root}/{experiment}"):
                    restore = experiment
                else:  # new points (or no Tune state to restore): a new experiment; finished points are skipped
                    log.info("resuming with a new Tune experiment: %s", "the grid adds points" if adds else
                             "Tune's state of the first run was not saved")
            if restore is None:
                experiment = next_experiment(grid)
                write_config(grid, plan, loaded, experiment)
            calibrated = calibrate(grid, plan, data, loaded)
            baseline, rankings = calibrated.baseline, calibrated.rankings
            del calibrated  # the trials build their own eval sets, on their own devices
            loaded.model.cpu()  # the state_dict travels to the trials from host memory
            trials = tuner.run_trials(grid, plan, data, loaded, baseline, rankings, experiment, bool(restore))
        try:
            rows = finish(grid, plan, data, loaded, baseline, trials.failed, trials.tracker)
        finally:
            trials.tracker.close()
    return Outcome(grid.folder, len(rows), plan.points, trials.failed, time.time() - started, trials.measured)


def finish(grid: Grid, plan: Plan, data: Dataset, loaded: Checkpoint, baseline: float, failed: list[str],
           tracker: Tracker) -> list[dict[str, Any]]:
    """Plots, report.md and the W&B summary run, from results.csv."""
    order = {c.name: i for i, c in enumerate(plan.convs)}
    rows = sorted(read_rows(grid.folder / "results.csv"), key=lambda r: (order[r["layer"]], r["criterion"], r["k"]))
    plots = report.write_plots(rows, baseline, grid.folder)
    wandb_where = {"disabled": "off", "offline": f"offline runs in {grid.folder / 'wandb'} (upload: `wandb sync "
                   f"{grid.folder / 'wandb'}/offline-run-*`)", "online": f"project {grid.wandb.project}, group "
                   f"{grid.name}"}[tracker.mode]
    meta = {"name": grid.name, "baseline": baseline, "eval_images": len(data.test), "dataset": data.name,
            "calibration": f"{len(data.calibration):,} held-out training images" if grid.sweep.calibration ==
            "holdout" else "the test images themselves (the seed's leaky choice)",
            "arch": grid.model.arch, "width": grid.model.width, "target": plan.target,
            "target_meaning": TARGET_MEANING[plan.target], "checkpoint": loaded.path,
            "checkpoint_sha256": loaded.sha256, "trained_accuracy": f"{loaded.meta.get('test_accuracy', 0):.2f}%",
            "versions": versions(), "wandb": wandb_where}
    path = report.write_report(rows, meta, failed, grid.folder, plan.points)
    tracker.summary(rows, baseline, plots, failed)
    log.info("wrote %s, %s and %s", grid.folder / "results.csv", path, grid.folder / "plots")
    return rows
