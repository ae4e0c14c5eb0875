"""The output folder of a sweep: one sweep at a time, never overwriting results, and what makes a resumed sweep
the same sweep (its identity: the measured grid and the checkpoint)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterator

import yaml

from model.checkpoint import Checkpoint
from runner import storage
from runner.basics import short
from runner.config import Grid, parse_grid
from runner.errors import InputError
from runner.inputs.trials import TrialPlan, plan_trials
from runner.outputs.results import read_rows
from runner.provenance import versions

ADDABLE = {"layers", "include_shortcuts", "k", "criteria"}  # sweep keys a resumed grid may change to add points
SAVED_EXTRAS = ("provenance", "identity", "tune_experiment", "sweep_id")  # config.yaml keys that are not grid keys


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """One sweep at a time per output folder: a second one is refused (the lock dies with its process)."""
    path = folder / ".lock"
    created = not folder.exists()
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
            raise InputError("output", str(folder), f"another sweep is running in this folder ({_holder(f)})",
                             "one sweep per output folder",
                             "wait for it, or give this one another name or --output") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        try:
            yield
        except InputError:  # a refused run leaves no folder behind when it made it and wrote nothing else there
            if created and [p.name for p in folder.iterdir()] == [path.name]:
                path.unlink()
                folder.rmdir()
            raise
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _holder(f: IO[str]) -> str:
    """Who holds the lock, as it wrote it (waiting a moment: it writes just after taking the lock)."""
    for _ in range(20):
        f.seek(0)
        text = f.read().strip()
        if text:
            return text
        time.sleep(0.05)
    return "unknown process"


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


def identity(grid: Grid, sha: str) -> dict[str, Any]:
    """What makes two runs the same sweep: the measured grid and the checkpoint (not paths, W&B or resources)."""
    d = grid.as_dict()
    return {"checkpoint_sha256": sha, "model": d["model"],
            "data": {**{k: v for k, v in d["data"].items() if k not in ("root", "download")},
                     "order": grid.data.resolved_order},
            "sweep": {k: v for k, v in d["sweep"].items() if k not in ("retries", "batch_size")}, "seed": d["seed"]}


def _leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"dotted.key": value} (lists are values)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def changed_keys(before: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs, in key order."""
    a, b = _leaves(before), _leaves(now)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def points_of(plan: TrialPlan) -> set[tuple[str, str, int, int]]:
    return {(t.layer, t.criterion, k, r) for t in plan.trials for k, r in t.points}


def resume_check(grid: Grid, plan: TrialPlan, sha: str) -> tuple[dict[str, Any], bool]:
    """The saved config.yaml, and whether the grid adds points to it. Refuses a changed checkpoint, and a grid
    that changes what the recorded points mean or drops any of them; the refusal names the key that changed."""
    saved = yaml.safe_load((grid.folder / "config.yaml").read_text(encoding="utf-8"))
    before, now = saved.get("identity", {}), identity(grid, sha)
    if isinstance(before.get("data"), dict):  # a sweep recorded before data.order took its subsets as given
        before["data"].setdefault("order", "given")
    if before == now:
        return saved, False
    refuse = "restore them, or start a new sweep under another name or --output"
    if before.get("checkpoint_sha256") != sha:
        raise InputError("--resume", str(grid.folder), "the checkpoint changed since this sweep started (sha256 "
                         f"{short(str(before.get('checkpoint_sha256', '?')))} then, {short(sha)} now)",
                         "the checkpoint the sweep started with", refuse)
    changes = changed_keys(before, now)
    fixed = [c for c in changes if not (c[0].startswith("sweep.") and c[0].split(".")[1] in ADDABLE)]
    if fixed:
        key, old, new = fixed[0]
        more = f" and {len(fixed) - 1} more" if len(fixed) > 1 else ""
        raise InputError("--resume", str(grid.folder), f"the grid changed since this sweep started ({key}: "
                         f"{old!r} then, {new!r} now{more})",
                         "the same grid, or one that only adds layers, K values or criteria", refuse)
    old = parse_grid({k: v for k, v in saved.items() if k not in SAVED_EXTRAS}, str(grid.folder / "config.yaml"))
    lost = points_of(plan_trials(old)) - points_of(plan)
    if lost:
        layer, criterion, k, r = sorted(lost)[0]
        draw = f", repeat {r}" if r else ""
        raise InputError("--resume", str(grid.folder), f"the grid drops {len(lost)} recorded points (first: {layer}, "
                         f"{criterion}, K={k}{draw})", "a grid that keeps every point and adds others", refuse)
    return saved, True


def sweep_id(grid: Grid, resume: bool) -> str:
    """This sweep's id, which its W&B run ids derive from: kept in config.yaml from its first start, so that
    --resume continues the same runs; a new one for a fresh sweep."""
    saved = grid.folder / "config.yaml"
    if resume and saved.is_file():
        doc = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        if doc.get("sweep_id"):
            return str(doc["sweep_id"])
        # a sweep started before ids were kept: derived from what stays the same
        started = str((doc.get("provenance") or {}).get("started", ""))
        return hashlib.sha1(f"{grid.folder}|{started}".encode()).hexdigest()[:8]
    return uuid.uuid4().hex[:8]


def write_config(grid: Grid, plan: TrialPlan, loaded: Checkpoint, experiment: str,
                 sweep: str | None = None) -> None:
    """config.yaml: the resolved grid, its provenance and identity, the Tune experiment it runs in, and the
    sweep's id (W&B run ids; by default the one config.yaml holds, or a new one)."""
    doc = {**grid.as_dict(), "provenance": {
        "checkpoint_sha256": loaded.sha256, "checkpoint_meta": {k: v for k, v in loaded.meta.items()
                                                                if k not in ("epoch_losses",)},
        "versions": versions(), "started": datetime.now(timezone.utc).isoformat(),
        "trials": len(plan.trials), "points": plan.points}, "identity": identity(grid, loaded.sha256),
        "tune_experiment": experiment, "sweep_id": sweep or sweep_id(grid, resume=True)}
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
