"""Ray's environment: the settings Ray and Tune read when imported or started, and where the cluster is.

Imports no Ray: the driver sets the environment here before anything imports Ray (`runner.job.cluster`).
"""

from __future__ import annotations

import os
import socket

from runner.errors import InputError

# Ray and Tune read these when imported or started; set before either happens.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no JSON/CSV/TensorBoard loggers: results.csv is the record
    "RAY_AIR_NEW_OUTPUT": "0",  # with verbose=0, Tune prints nothing; the collector logs progress instead
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    # Tune's own state: every 60 s is enough, since --resume skips every point already in results.csv (its
    # default, adaptive period spends a noticeable share of a short sweep writing it)
    "TUNE_GLOBAL_CHECKPOINT_S": "60",
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",  # a failed trial's traceback stays in its error file; the collector says it
    "WANDB_SILENT": "true",
}

# For a Ray on loopback only: one this process starts itself, or a cluster whose address is 127.0.0.1 (all its
# nodes on this machine). The node address is then 127.0.0.1 and every socket binds to loopback. Never when
# joining a cluster at a real address (--address, or RAY_ADDRESS as `ray job submit` sets it): the driver must
# then present the machine's real address to the cluster.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# Only for the Ray this process starts itself (a cluster we join keeps its own settings):
OWN_RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",  # a loopback-only Ray needs no token file in ~/.ray
    # a sweep runs only actors, which Ray never gives a prestarted task worker
    "RAY_prestart_worker_first_driver": "0",
    # one malloc arena: a trial computes in a Tune thread, whose own arena glibc keeps unmapping
    # (runner.engine.device.tune_allocator); Ray's processes inherit it
    "MALLOC_ARENA_MAX": "1",
    # the raylet's first connection to its object store can lose a race: retry soon (the same 10 s in all);
    # Ray also waits this long between a worker's requests for the system config
    "RAY_raylet_client_connect_timeout_milliseconds": "100", "RAY_raylet_client_num_connect_attempts": "100",
}


def cluster_address(flag: str | None) -> str | None:
    """The cluster to join: --address, else RAY_ADDRESS (as `ray job submit` sets it), else none (a local Ray)."""
    return flag or os.environ.get("RAY_ADDRESS") or None


def on_loopback(address: str | None) -> bool:
    """Whether the Ray we start (address None) or join lives on 127.0.0.1 only."""
    if not address:
        return True
    host = address.split("://")[-1].rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def ray_env(address: str | None) -> dict[str, str]:
    """The environment for a Ray this process starts (address None) or joins."""
    return RAY_ENV | (LOCAL_RAY_ENV if on_loopback(address) else {}) | ({} if address else OWN_RAY_ENV)


def set_ray_env(address: str | None) -> None:
    """Set Ray's environment (keeping what the user set): call before `runner.job.cluster` (or ray) is imported."""
    for key, value in ray_env(address).items():
        os.environ.setdefault(key, value)


def check_reachable(address: str) -> None:
    """A cluster address that nothing answers at is a bad flag (one line, exit 2), not a two-minute hang in
    ray.init. Ray's own forms ("auto", "ray://...") are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except OSError as e:
        raise InputError("--address", address, f"no Ray cluster answers there ({e.strerror or e})",
                         "the address of a running Ray head (host:port, as `ray start --head` prints it)",
                         "start the cluster, fix the address, or leave --address out to run on this machine") from None
