"""Ray itself: start a local Ray on 127.0.0.1 or join a cluster, for the duration of a block.

Importing this module imports Ray, which reads its environment at import: the driver calls
`runner.job.ray_env.set_ray_env` first.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import ray

from runner.config import ResourcesConfig
from runner.errors import InputError
from runner.job.resources import check_fit

log = logging.getLogger(__name__)

CHECKOUT = Path(__file__).resolve().parents[2]  # holds the `model` and `runner` packages

# Tune's per-trial chatter, which the collector replaces with one line per retry or failure (Tune's other
# warnings, such as "no trial has started: the cluster lacks resources", stay on the console).
TUNE_CHATTER = {
    "ray.tune.execution.tune_controller": ("Trial task failed for trial", "Could not re-use actor for trial"),
    "ray.tune.tune": ("Trials did not complete", "Experiment has been interrupted",
                      "Training has been interrupted"),
}


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_tune_chatter() -> None:
    """Tune's warnings reach the console; its per-trial messages do not (once per process)."""
    logging.getLogger("ray.tune").setLevel(logging.NOTSET)  # inherit the "ray" logger's level (warnings)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    for name, prefixes in TUNE_CHATTER.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))


def code_env() -> dict[str, Any]:
    """Ray's runtime_env that ships this checkout's `model` and `runner` packages to every node, so that the
    nodes of a cluster need the dependencies but not the code. Left out when a `ray job submit` already ships
    py_modules (Ray refuses two)."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    if (job.get("runtime_env") or {}).get("py_modules"):
        return {}
    return {"py_modules": [str(CHECKOUT / "model"), str(CHECKOUT / "runner")], "excludes": ["__pycache__", "*.pyc"]}


@contextmanager
def ray_session(address: str | None, dashboard: bool = False, resources: ResourcesConfig | None = None,
                trials: int = 0) -> Iterator[str | None]:
    """Ray for the block: joins the cluster at `address`, or starts a local Ray on 127.0.0.1, with no dashboard
    unless asked for (and stops it afterwards). An already running Ray (tests) is used as it is. With
    `resources`, every trial's request is checked against the cluster first (runner.job.resources). Yields the
    line that says what was started or joined (None for a Ray already running), for the caller to log once its
    own checks have passed: a refusal stays one line."""
    started = start_ray(address, dashboard)
    try:
        quiet_tune_chatter()
        if resources is not None:
            check_fit(resources, trials)
        yield started
    finally:
        if started:
            stop_ray()


@contextmanager
def heap_frozen() -> Iterator[None]:
    """The objects that exist now kept out of the garbage collector's scans for the block (gc.freeze; unfrozen
    after it). Entered just before the trials, and left after Ray's stop: the full collection that `stop_ray`
    makes then scans only what the trials made, not the driver's whole heap (the imports', Ray's, W&B's
    objects), and it holds the interpreter's lock while the report is drawn in another thread. Garbage among the frozen objects waits for the collections after the block. A
    process that has frozen objects itself (a notebook's, a server's) is left as it is: gc cannot unfreeze only
    ours."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _stop_monitor() -> None:
    """Kill the autoscaler monitor of a Ray this process started: it ignores SIGTERM, and ray.shutdown() waits
    a full second for it before killing it anyway, most of the time a sweep spends stopping Ray.
    A local Ray has nothing to autoscale and the monitor keeps no state. Ray's private node API: if it moves,
    the shutdown is just a second slower."""
    node = getattr(sys.modules.get("ray._private.worker"), "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    for info in processes.get("monitor", ()):
        try:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=5)
        except Exception as e:  # noqa: BLE001  ray.shutdown() stops it the slow way
            log.debug("could not stop Ray's monitor early: %s", e)


def stop_ray() -> None:
    """ray.shutdown(), safe while other threads of the driver run (the report is written while Ray stops).

    A Ray handle that is garbage (an ObjectRef or actor handle in a reference cycle of Tune's objects) is
    released by its finaliser, in whatever thread the garbage collector happens to run; one released while Ray
    shuts down reaches a core worker that is gone, and Ray then ends the whole process (exit code 1: "The core
    worker has already been shutdown ... The process will exit"; seen once at the end of a finished 1,800-point
    sweep). So the garbage goes first, while Ray is up, and no collection runs during the shutdown; afterwards
    the finalisers see a disconnected worker and do nothing."""
    gc.collect()
    gc.disable()
    try:
        _stop_monitor()
        ray.shutdown()
    finally:
        gc.enable()


def start_ray(address: str | None, dashboard: bool = False) -> str | None:
    """Start or join Ray; returns the line that says which (for the log), or None when Ray was already running
    (and so is not this call's to stop)."""
    if ray.is_initialized():
        return None
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    if address:
        ray.init(address=address, runtime_env=code_env(), **quiet)
        return f"joined the Ray cluster at {address}: {_resources()}"
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
    return f"started a local Ray on 127.0.0.1 ({where}): {_resources()}"


def _resources() -> str:
    r = ray.cluster_resources()
    return f"{len(ray.nodes())} node(s), {r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} GPUs"
