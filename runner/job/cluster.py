"""Ray itself: start a local Ray on 127.0.0.1 or join a cluster, for the duration of a block.

Importing this module imports Ray, which reads its environment at import: the driver calls
`runner.job.ray_env.set_ray_env` first.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import ray

from runner.errors import InputError

log = logging.getLogger(__name__)

# Run in every worker of a Ray we start, as it starts: imports what trials need (torch, the engine) while the
# driver is still calibrating, instead of when the first trial arrives.
WARM_UP = "runner.job.trial.warm_up"


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
            context = ray.init(address="local", runtime_env={"worker_process_setup_hook": WARM_UP}, **board, **quiet)
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
