"""Experiment tracking in Weights & Biases runs (docs/outputs.md#weights--biases): the Tracker the jobs hold
(`runner.outputs.tracking`) when W&B is on, and `make_tracker`, which gives it or the tracker that does nothing.

A W&B failure (no network, bad key, server down) never stops or loses a sweep: the tracker says so once, falls
back to offline runs where it can, or turns itself off, and the results still land on disk.

The runs of a sweep, as W&B users expect them:
- `train` (job type train): the checkpoint's training curves, and the checkpoint itself as a `model` artifact;
- one run per trial (job type prune-eval, named layer/criterion, K as the step metric), whose summary describes
  the layer (safe K, area under the drop curve, accuracy at each fraction) rather than repeating its last K;
- `summary` (job type summary): the table of every point, the plots, and the sweep's outputs as one
  `sweep-results` artifact.
Run ids are derived from the sweep's id and the run's name, so `--resume` continues the same runs.
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import shutil
import socket
import tempfile
import urllib.parse
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from runner.basics import TrainLog, short
from runner.outputs.figures import png
from runner.outputs.report import trial_summary
from runner.outputs.results import STEP_METRICS, by_trial
from runner.outputs.tracking import (SUMMARY_RUN, TRAIN_RUN, NullTracker, Picture, RunSpec, Tracker, Tracking,
    model_artifact)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"
POINT_METRICS = STEP_METRICS  # logged at every K of a trial's run (*_recalibrated: after adaptive BN, when on)
TRIAL_CONFIG = ("baseline_accuracy", "device", "dtype")  # a trial run's config, from its first row
TRAIN_METRICS = ("loss", "train_accuracy", "lr", "seconds")
# WANDB_MODE's values (W&B's own switch) -> our modes
ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def has_api_key() -> bool:
    """A W&B key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)).hostname or ""
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def server_reachable(timeout: float = 3.0) -> bool:
    """Whether the W&B server accepts a TCP connection (a fast check before a slow, blocking wandb.init)."""
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout).close()
        return True
    except OSError:
        return False


def resolve_mode(mode: str) -> str:
    """auto -> W&B's own switch when it is set (WANDB_MODE, or the older WANDB_DISABLED), else online when a key
    is configured, else offline. An explicit mode (grid file or --wandb-mode) is used as it is."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ENV_MODES:
        return ENV_MODES[env]
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled"
    return "online" if has_api_key() else "offline"


def first_line(e: BaseException, limit: int = 120) -> str:
    """An error's message for a one-line warning (W&B's messages run to many lines; some are empty)."""
    return (str(e).splitlines() or [""])[0][:limit]


def run_id(sweep_id: str | None, name: str) -> str | None:
    """A W&B run id that is the same every time this sweep logs this run (None: W&B makes a new one)."""
    if sweep_id is None:
        return None
    return f"{sweep_id}-{name}" if name in (SUMMARY_RUN, TRAIN_RUN) else \
        f"{sweep_id}-{short(hashlib.sha1(name.encode()).hexdigest())}"


def preload(mode: str) -> None:
    """Import what W&B's runs need ahead of the first one, in a thread that would otherwise wait (the sweep's
    calibration thread waits for Ray): wandb itself, and the W&B Launch package that every `wandb.init` imports
    to apply staged Launch inputs (otherwise imported on a sweep's first trial run, with CPU taken from the trials).
    That package's path is W&B's own: if a release moves it, its import is just not done ahead."""
    if resolve_mode(mode) == "disabled":
        return
    import wandb

    try:
        import wandb.sdk.launch.inputs.internal  # noqa: F401  loaded ahead: see the docstring
    except ImportError:
        log.debug("W&B: no wandb.sdk.launch.inputs.internal to import ahead")


def usable_settings(settings_class: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Settings this wandb has: its private `x_*` ones come and go between versions, and an unknown one makes
    wandb.Settings refuse them all."""
    known = getattr(settings_class, "model_fields", None)
    if known is None:
        return {k: v for k, v in values.items() if not k.startswith("x_")}
    return {k: v for k, v in values.items() if not k.startswith("x_") or k in known}


class WandbTracker:
    """The W&B runs of a sweep, all written from the driver."""

    def __init__(self, tracking: Tracking) -> None:
        import wandb  # imported here: W&B is only loaded when it is used

        self.wandb = wandb
        self.t = tracking
        self.mode = tracking.mode
        self.runs: dict[str, Any] = {}
        self.unusable: set[str] = set()  # artifacts that could not be found (told once, in the debug log)
        self.scratch: Path | None = None  # PNG files of the images being logged (see log_point)
        self.made = 0
        if self.mode == "online" and not server_reachable():
            self._fall_back(f"the W&B server {os.environ.get('WANDB_BASE_URL', DEFAULT_BASE_URL)} is not "
                            "reachable")
        tracking.folder.mkdir(parents=True, exist_ok=True)

    def _fall_back(self, why: str) -> None:
        """Say once what went wrong and carry on offline (or, if offline fails too, without W&B)."""
        folder = self.t.folder
        if self.mode == "online":
            log.warning("W&B: %s; logging offline runs to %s/wandb instead (upload later with "
                        "`wandb sync %s/wandb/offline-run-*`)", why, folder, folder)
            self.mode = "offline"
        else:
            log.warning("W&B: %s; W&B logging is off for the rest of this sweep (results are still on disk)", why)
            self.mode = "disabled"

    def _start(self, spec: RunSpec, lean: bool = True) -> Any:
        """A run (resumed when this sweep logged it before). Lean runs skip W&B's per-run scans (installed
        packages, git, machine info): several times faster to start, which matters at one run per trial; the summary run keeps them, and every run's config carries the library versions and
        checkpoint sha256."""
        settings = dict(console="off", x_disable_stats=True, silent=True)
        if lean:
            settings.update(x_save_requirements=False, disable_git=True, x_disable_meta=True, disable_code=True,
                            disable_job_creation=True, x_disable_machine_info=True)
        while self.mode != "disabled":
            try:
                if self.mode == "online":
                    settings["init_timeout"] = 20
                run = self.wandb.init(
                    mode=self.mode, dir=str(self.t.folder), project=self.t.project, entity=self.t.entity,
                    group=self.t.group, reinit="create_new", job_type=spec.job_type, name=spec.name,
                    id=run_id(self.t.sweep_id, spec.name), resume="allow", tags=list(spec.tags) or None,
                    config={**self.t.config, **spec.config, **({"checkpoint_artifact": spec.uses} if spec.uses
                                                               else {})},
                    settings=self.wandb.Settings(**usable_settings(self.wandb.Settings, settings)))
            except Exception as e:  # noqa: BLE001  any W&B failure must not stop the sweep
                self._fall_back(f"starting a run failed ({type(e).__name__}: {first_line(e)})")
                continue
            if spec.uses:
                self._use(run, spec.uses)
            return run
        return None

    def _use(self, run: Any, ref: str) -> None:
        """Record that the run read the model artifact. W&B records artifact use online only (offline,
        `use_artifact` raises): offline runs name it in their config (`checkpoint_artifact`) instead."""
        if self.mode != "online" or ref in self.unusable:
            return
        try:
            run.use_artifact(ref, type="model")
        except Exception as e:  # noqa: BLE001  not logged yet (trained with W&B off): lineage is a nicety
            self.unusable.add(ref)
            log.debug("W&B: artifact %s not used (%s: %s)", ref, type(e).__name__, e)

    # ---- training ----

    def train_log(self, run: RunSpec) -> TrainLog:
        return WandbTrainLog(self, run)

    # ---- trials ----

    def _trial_run(self, spec: RunSpec, row: dict[str, Any]) -> Any:
        if spec.name not in self.runs:
            # known once the trial has measured: its own baseline, on its own device and precision
            run = self._start(replace(spec, config={**spec.config, **{k: row[k] for k in TRIAL_CONFIG if k in row}}))
            if run is None:
                return None
            self._safely(_trial_metrics, run)
            self.runs[spec.name] = run
        return self.runs[spec.name]

    def log_point(self, run: RunSpec, row: dict[str, Any], images: Callable[[], dict[str, Picture]]) -> None:
        """One K of a trial's run; `images` gives the point's feature-map images (only called when logged): RGB
        arrays, or the PNG files the collector already wrote for the figures on disk. W&B is given a PNG file
        either way, which it copies as it is: the pixels are encoded here (runner.outputs.figures.png, faster than
        Pillow's encoder), into a scratch file removed once logged; the same bytes on disk and on W&B.

        Every point's numbers are logged; the images only for the first order of a random criterion (repeat 0),
        as on disk: the other draws picture the same layer with other random channels zeroed, and rendering them
        would take a large share of the W&B work from the trials' CPUs."""
        wb = self._trial_run(run, row)
        if wb is not None:
            self._safely(self._log_point, wb, run, row, images)

    def _log_point(self, wb: Any, run: RunSpec, row: dict[str, Any], images: Callable[[], dict[str, Picture]]) -> None:
        data = {"k": row["k"], **{m: row[m] for m in POINT_METRICS if m in row}}
        scratch = []
        try:
            if self.t.feature_maps and not row.get("repeat"):
                for name, image in images().items():
                    if not isinstance(image, Path):
                        image = self._scratch_png(image)
                        scratch.append(image)
                    data[f"feature_maps/{name}"] = self.wandb.Image(str(image), caption=f"{run.name} K={row['k']}")
            wb.log(data)  # W&B has copied the files once this returns
        finally:
            for path in scratch:
                path.unlink(missing_ok=True)

    def _scratch_png(self, image: np.ndarray) -> Path:
        """The image as a PNG file in this tracker's scratch folder (made on first use in the W&B folder, beside
        W&B's own `wandb/`, and removed at close)."""
        if self.scratch is None:
            self.scratch = Path(tempfile.mkdtemp(prefix=".wandb-images-", dir=self.t.folder))
        self.made += 1
        path = self.scratch / f"{self.made}.png"
        path.write_bytes(png(image))
        return path

    def finish_trial(self, name: str, rows: Sequence[dict[str, Any]], failed: bool = False) -> None:
        """End a trial's run, its summary describing every point it has (those of an earlier run included)."""
        run = self.runs.pop(name, None)
        if run is None:
            return
        if rows:
            self._safely(run.summary.update, trial_summary(rows))
        self._safely(run.finish, exit_code=1 if failed else 0)

    # ---- the summary run ----

    def summary(self, run: RunSpec, rows: Sequence[dict[str, Any]], baseline: float, figures: dict[str, Path],
                failed: Sequence[str], files: Sequence[Path], extra: dict[str, Any] | None = None) -> None:
        """`extra`: more keys for the run's summary (the near-chance warning)."""
        wb = self._start(run, lean=False)
        if wb is None:
            return
        wandb = self.wandb
        if rows:
            columns = [c for c in rows[0] if c != "per_class_accuracy"]
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            trials = by_trial(rows)
            data: dict[str, Any] = {"results": table, "accuracy_vs_k": self._series(
                trials, "accuracy", "accuracy vs K (plain: the trained BatchNorm statistics)")}
            if rows[0].get("accuracy_recalibrated") is not None:
                data["accuracy_vs_k_recalibrated"] = self._series(
                    trials, "accuracy_recalibrated", "accuracy vs K after adaptive BN (recalibrated)")
            data.update({f"plots/{name}": wandb.Image(str(path)) for name, path in figures.items()
                         if path.is_file()})
            self._safely(wb.log, data)
        self._safely(wb.summary.update, {"baseline_accuracy": baseline, "failed_trials": list(failed),
                                         "points": len(rows), **(extra or {})})
        self._safely(self._log_results, wb, files)
        self._safely(wb.finish, exit_code=1 if failed else 0)

    def record(self, run: RunSpec, values: dict[str, Any], figures: dict[str, Path],
               rows: Sequence[dict[str, Any]]) -> None:
        """A run that records a finished job's numbers (the validation's): its rows as a table, its figures,
        and `values` in its summary."""
        wb = self._start(run, lean=False)
        if wb is None:
            return
        data: dict[str, Any] = {}
        if rows:
            columns = list(rows[0])
            data["table"] = self.wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        data.update({f"plots/{name}": self.wandb.Image(str(path)) for name, path in figures.items() if path.is_file()})
        if data:
            self._safely(wb.log, data)
        self._safely(wb.summary.update, values)
        self._safely(wb.finish, exit_code=0)

    def _series(self, trials: dict, column: str, title: str) -> Any:
        """One line per trial of `column` against K (random: the mean over its draws)."""
        series = sorted(trials)
        xs, ys = [], []
        for t in series:
            by_k: dict[int, list[float]] = {}
            for r in trials[t]:
                by_k.setdefault(r["k"], []).append(r[column])
            xs.append(list(by_k))
            ys.append([sum(v) / len(v) for v in by_k.values()])
        return self.wandb.plot.line_series(xs=xs, ys=ys, keys=[t.key for t in series], title=title,
                                           xname="K (channels pruned)")
    def log_table(self, run: RunSpec, name: str, rows: Sequence[dict[str, Any]], images: dict[str, Path]) -> None:
        wb = self._start(run)
        if wb is None:
            return
        columns = list(rows[0]) if rows else []
        data: dict[str, Any] = {name: self.wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])}
        data.update({k: self.wandb.Image(str(p)) for k, p in images.items() if p.is_file()})
        self._safely(wb.log, data)
        self._safely(wb.finish)

    def _log_results(self, run: Any, files: Sequence[Path]) -> None:
        """The sweep's outputs as one artifact (copied by W&B: results.csv may grow on a later --resume)."""
        artifact = self.wandb.Artifact(f"sweep-results-{self.t.group}", type="sweep-results",
                                       metadata={"sweep": self.t.group, "sweep_id": self.t.sweep_id})
        for path in files:
            if path.is_file():
                artifact.add_file(str(path), name=str(path.relative_to(self.t.folder)))
        run.log_artifact(artifact)

    def _safely(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  W&B trouble is reported, never fatal
            self._fall_back(f"{getattr(fn, '__name__', 'call')} failed ({type(e).__name__}: {first_line(e)})")

    def close(self) -> None:
        for name in list(self.runs):
            run = self.runs.pop(name)
            self._safely(run.finish, exit_code=1)  # runs that did not finish (an interrupted sweep) end as failed
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


class WandbTrainLog:
    """The training run: its curves per epoch, then the checkpoint as a `model` artifact."""

    def __init__(self, tracker: WandbTracker, spec: RunSpec) -> None:
        self.tracker, self.spec, self.run = tracker, spec, None

    def start(self, config: dict[str, Any]) -> None:
        t = self.tracker
        self.run = t._start(RunSpec(self.spec.name, self.spec.job_type, {**self.spec.config, **config},
                                    self.spec.tags, self.spec.uses))
        if self.run is not None:
            t.runs[self.spec.name] = self.run  # closed as failed if training does not finish
            t._safely(_train_metrics, self.run)

    def epoch(self, values: dict[str, float]) -> None:
        if self.run is not None:
            self.tracker._safely(self.run.log, values)

    def trained(self, path: str, sha256: str, meta: dict[str, Any]) -> None:
        t, run = self.tracker, self.tracker.runs.pop(self.spec.name, None)
        if run is None:
            return
        ref = model_artifact(path, sha256)
        name, alias = ref.split(":")
        keep = ("arch", "width", "num_classes", "dataset", "test_accuracy", "test_images", "train_images",
                "seed", "train_seconds", "device", "classes", "mean", "std", "recipe", "versions")
        artifact = t.wandb.Artifact(name, type="model", metadata={"sha256": sha256,
                                                                  **{k: meta[k] for k in keep if k in meta}})

        def log_model() -> None:
            # immutable: W&B reads the file where it is (checkpoints are written whole, never changed)
            artifact.add_file(path, name=Path(path).name, policy="immutable")
            run.log_artifact(artifact, aliases=["latest", alias])

        t._safely(log_model)
        t._safely(run.summary.update, {"test_accuracy": meta.get("test_accuracy"), "checkpoint_sha256": sha256,
                                       "checkpoint_artifact": ref})
        t._safely(run.finish, exit_code=0)


def _trial_metrics(run: Any) -> None:
    run.define_metric("k", summary="none")
    for name in (*POINT_METRICS, "feature_maps/*"):  # the summary describes the layer (finish_trial), not the
        run.define_metric(name, step_metric="k", summary="none")  # last K


def _train_metrics(run: Any) -> None:
    run.define_metric("epoch")
    for name in TRAIN_METRICS:
        run.define_metric(name, step_metric="epoch")


def make_tracker(tracking: Tracking) -> Tracker:
    from dataclasses import replace

    mode = resolve_mode(tracking.mode)
    if mode == "disabled":
        return NullTracker()
    try:
        return WandbTracker(replace(tracking, mode=mode))
    except Exception as e:  # noqa: BLE001  a broken W&B install must not stop the sweep either
        log.warning("W&B: cannot start (%s: %s); W&B logging is off for this sweep (results are still on disk)",
                    type(e).__name__, first_line(e))
        return NullTracker()
