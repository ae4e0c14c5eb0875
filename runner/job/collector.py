"""The driver side of the trials: a Tune callback that turns every reported point into a results.csv row, a
W&B step with feature-map images, and (for a few K per trial) feature-map figures on disk.

It runs in the driver process, so a multi-node sweep's results and offline W&B runs all land in one place.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
from ray import tune

from runner.job.board import BoardStats, board_actor, find_board
from runner.outputs import figures
from runner.outputs.results import COLUMNS, ResultsTable, TrialId, by_trial
from runner.outputs.tracking import RunSpec, Tracker, Tracking
from runner.outputs.wandb_tracker import make_tracker
from runner.storage import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """Plain, picklable settings (Tune pickles its callbacks with the experiment)."""

    folder: str
    sweep: str
    checkpoint_sha256: str
    eval_images: int
    tracking: Tracking  # W&B, in the mode the driver's tracker settled on
    runs: dict[str, RunSpec]  # trial key -> its W&B run
    figure_ks: dict[str, tuple[int, ...]]  # trial key -> K values whose feature maps are saved to disk
    total_points: int
    board: str  # the ProgressBoard actor's name


def point_title(row: dict[str, Any]) -> str:
    return (f"{row['layer']}, {row['target']} pruning by {row['criterion']}, K={row['k']}/{row['channels']}, "
            f"accuracy {row['accuracy']:.2f}%")


FINAL_CAPTION = f"final stage output: the {figures.FINAL_TILES} channels with the highest mean"


def feature_map_images(row: dict[str, Any], maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The two images of a point, each with its caption and colour scale: the pruned layer's output channels,
    and the final stage (its strongest channels). The same pictures go to W&B and, for a few K, to disk."""
    out = {}
    if "layer" in maps:
        out["pruned_layer"] = figures.grid_image(maps["layer"], title=f"{point_title(row)}\n{figures.layer_caption(row['target'])}")
    if "final" in maps:
        out["final_stage"] = figures.grid_image(maps["final"], final=True,
                                                title=f"{point_title(row)}\n{FINAL_CAPTION}")
    return out


class Backlog:
    """The driver's work for each point besides its results.csv row (W&B steps, figures on disk), done in order
    in a thread of its own, so that Tune's loop hands the next step to the trials at once. The first error it
    meets is raised again in the driver's thread at the next call (a full disk still stops the sweep)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="collector-backlog", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., None], *args: Any, check: bool = True) -> None:
        """Queue a job; with `check`, first raise the error an earlier job met. Tune's trial-complete and
        trial-error callbacks pass check=False: Tune logs an exception raised there with a traceback (as "Error
        stopping trial") instead of stopping, so the error waits for the next point's callback or for `close`."""
        if check:
            self.check()
        self._jobs.put((fn, args))

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Finish every job submitted, then raise the first error, if any."""
        self._jobs.put(None)
        self._thread.join()
        self.check()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is None:  # after an error the rest is skipped: the sweep is stopping
                started = time.perf_counter()
                try:
                    job[0](*job[1])
                except BaseException as e:  # noqa: BLE001  raised again in the driver's thread
                    self._error = e
                self.seconds += time.perf_counter() - started


@dataclass
class Live:
    """The collector's state in the driver while trials run (never pickled: files and W&B runs stay here)."""

    table: ResultsTable
    tracker: Tracker
    board: Any  # the ProgressBoard actor's handle: None until one is needed (runner.job.board)
    last_note: float = 0.0  # when progress was last logged
    first: float = 0.0  # when the first new point arrived
    new: int = 0  # points added to results.csv in this run
    busy: float = 0.0  # seconds Tune's loop spent here (the rows): the trials' steps wait for it
    unsent: list[tuple[str, str, int, int]] = field(default_factory=list)  # points not yet on the board
    measured: int = 0  # points measured in this run, those a retried trial measured again included
    first_at: float = 0.0  # wall-clock times the first and the last of them arrived
    last_at: float = 0.0
    backlog: Backlog = field(default_factory=Backlog)  # W&B steps and figures, in their own thread


# The collectors set up in this driver process, by board name: Tune may run a copy of the Collector it was
# given (a restored experiment unpickles its own), so the driver reads the numbers it needs afterwards here.
_LIVE: dict[str, Live] = {}


def measured(board: str) -> BoardStats:
    """Points measured by the sweep whose board is named `board`, and when the first and the last arrived (after
    its Tuner.fit returned; forgets them)."""
    live = _LIVE.pop(board, None)
    return BoardStats(live.measured, live.first_at, live.last_at) if live else BoardStats(0, 0.0, 0.0)


class Collector(tune.Callback):
    """Tune pickles its callbacks with the experiment and restores them on --resume, so everything live is
    made in `setup` (which runs in the driver) and closed in `on_experiment_end`; what the driver needs
    afterwards (points measured) it reads with `measured`."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.live: Live | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"context": self.context, "live": None}  # open files and W&B runs never travel

    def setup(self, **info: Any) -> None:
        c = self.context
        folder = Path(c.folder)
        self.live = _LIVE[c.board] = Live(ResultsTable(folder / "results.csv"), make_tracker(c.tracking),
                                           find_board(c.board))  # a resumed sweep's, else None
        (folder / "feature_maps").mkdir(parents=True, exist_ok=True)

    def flush(self, wait: bool = False) -> None:
        """Send the points measured since the last flush to the progress board (if the sweep has one), in one
        actor call. The board is read only by a trial that starts again (a retry, a resumed sweep), so it is
        brought up to date when a trial ends, fails or is retried, not once per point (each call takes CPU from
        the trials). `wait`: until the board has them."""
        live = self.live
        if live is not None and live.board is not None and live.unsent:
            sent = live.board.record.remote(live.unsent)
            live.unsent = []
            if wait:
                ray.get(sent)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.live is not None:
            live = self.live
            self.flush()
            try:
                live.backlog.close()
            finally:
                live.tracker.close()  # runs of trials that did not finish (an interrupted sweep) end as failed
            log.debug("collector: %.1f s in Tune's loop and %.1f s in the background for %d new points",
                      live.busy, live.backlog.seconds, live.new)

    def _row(self, result: dict[str, Any]) -> dict[str, Any]:
        """A results.csv row: the trial's numbers (its drop is against its own baseline) and the checkpoint."""
        row = {k: result[k] for k in COLUMNS if k in result}
        row["checkpoint_sha256"] = self.context.checkpoint_sha256
        return row

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "k" not in result:
            return
        started = time.perf_counter()
        try:
            self._record(result)
        finally:
            self.live.busy += time.perf_counter() - started

    def _record(self, result: dict) -> None:
        live = self.live
        maps = getattr(result.pop("maps", None), "arrays", {})  # in place: keeps them out of Tune's state
        row = self._row(result)
        # every point measured, those a retried trial measures again too
        now = time.time()
        live.measured += 1
        live.first_at, live.last_at = live.first_at or now, now
        if live.board is not None:
            live.unsent.append((row["layer"], row["criterion"], row["k"], row["repeat"]))
        if not live.table.add(row):
            return  # already recorded (a retried or resumed trial repeating a point)
        live.new += 1
        trial_id = TrialId(row["layer"], row["criterion"])
        if not row.get("skipped"):  # a point stop_drop skipped has no numbers to log
            live.backlog.submit(self._write, trial_id, row, maps)
        self._progress()

    def _write(self, trial_id: TrialId, row: dict[str, Any], maps: dict[str, np.ndarray]) -> None:
        """A point's figures when its K is one of the trial's figure K, and its W&B step (in the backlog). A point
        with figures gives W&B their PNG files: encoded once, the same bytes in both places."""
        def images() -> dict[str, np.ndarray]:  # rendered only when W&B logs them
            return feature_map_images(row, maps) if maps else {}

        if maps and row["repeat"] == 0 and row["k"] in self.context.figure_ks.get(trial_id.key, ()):
            files = self._save_figures(row, images(), maps)
            self.live.tracker.log_point(self.context.runs[trial_id.key], row, lambda: files)
        else:
            self.live.tracker.log_point(self.context.runs[trial_id.key], row, images)

    def _save_figures(self, row: dict[str, Any], images: dict[str, np.ndarray],
                      maps: dict[str, np.ndarray]) -> dict[str, Path]:
        """The two images (the pictures W&B gets), and the raw mean maps (for the report's figures); returns the
        images' files."""
        folder = Path(self.context.folder) / "feature_maps" / row["layer"]
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{row['criterion']}_k{row['k']:04d}"
        files = {}
        for name, suffix in (("pruned_layer", "layer"), ("final_stage", "final")):
            if name in images:
                files[name] = folder / f"{stem}_{suffix}.png"
                figures.save_png(images[name], files[name])
        with atomic_path(folder / f"{stem}_maps.npz") as tmp:
            np.savez_compressed(tmp, **maps)
        return files

    def _progress(self) -> None:
        """A line every 10 s: points done, rate, time left (from the rate since the first point arrived)."""
        live, now = self.live, time.time()
        done, total, new = len(live.table.keys), self.context.total_points, live.new
        if new == 1:
            live.first = now
        if now - live.last_note >= 10 or done == total:
            live.last_note = now
            span = now - live.first
            rate = (new - 1) / span if new > 1 and span > 0 else 0.0
            left = f", about {(total - done) / rate:.0f} s left" if rate and done < total else ""
            log.info("points %d/%d (%.0f%%)%s", done, total, 100 * done / total, left)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.flush()
        trial_id = _trial_id(trial)
        rows = by_trial(self.live.table.measured).get(trial_id, [])
        self.live.backlog.submit(self.live.tracker.finish_trial, trial_id.key, rows, check=False)
        worst = min(rows, key=lambda r: r["accuracy"], default=None)
        shown = f"accuracy at K={worst['k']}: {worst['accuracy']:.2f}% (baseline {worst['baseline_accuracy']:.2f}%)" \
            if worst else "no new points"
        log.info("trial done: %-40s %s", trial_id.key, shown)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Before the trial starts again and asks the board what it has measured (Tune restarts it after this
        returns): the board holds every point so far, made now with all of results.csv if this is the sweep's
        first retry."""
        live = self.live
        if live.board is None:
            live.board = board_actor(self.context.board, sorted(live.table.keys))
            ray.get(live.board.finished.remote("", ""))  # it is up (and named) before the trial restarts
        else:
            self.flush(wait=True)
        log.warning("trial %s failed; retrying from its last finished K", _trial_id(trial).key)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.flush()
        trial_id = _trial_id(trial)
        key = trial_id.key
        rows = by_trial(self.live.table.measured).get(trial_id, [])
        self.live.backlog.submit(self.live.tracker.finish_trial, key, rows, True, check=False)
        log.error("trial %s failed after its retries (details: %s)", key, getattr(trial, "error_file", None))


def _trial_id(trial: Any) -> TrialId:
    return TrialId(trial.config["layer"], trial.config["criterion"])
