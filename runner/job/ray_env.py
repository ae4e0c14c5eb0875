"""Ray's environment: the settings Ray and Tune read when imported or started, and where the cluster is.

Imports no Ray: the driver sets the environment here before anything imports Ray (`runner.job.cluster`).
"""

from __future__ import annotations

import os
import socket

from runner.errors import InputError

# Ray and Tune read these when imported or started; set before either happens (see README, "Ray").
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no JSON/CSV/TensorBoard loggers: results.csv is the record
    "RAY_AIR_NEW_OUTPUT": "0",  # with verbose=0, Tune prints nothing; the collector logs progress instead
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    # Tune's own state: every 60 s is enough, since --resume skips every point already in results.csv (its
    # default, adaptive period spent about 5% of the demo's time writing it)
    "TUNE_GLOBAL_CHECKPOINT_S": "60",
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",  # a failed trial's traceback stays in its error file; the collector says it
    "WANDB_SILENT": "true",
}

# For a Ray on loopback only: one this process starts itself, or a cluster whose address is 127.0.0.1 (all its
# nodes on this machine). The node address is then 127.0.0.1 and every socket binds to loopback. Never when
# joining a cluster at a real address (--address, or RAY_ADDRESS as `ray job submit` sets it): the driver must
# then present the machine's real address to the cluster.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# Only for the Ray this process starts itself: no token file in ~/.ray for a local, loopback-only instance (a
# cluster we join keeps whatever authentication it was started with); no task workers started in advance:
# Ray never hands a task worker to an actor and a sweep runs nothing but actors (the trials, the progress
# board), so those two workers only took CPU from the driver and the trials while the sweep started; and one
# malloc arena per process (glibc reads it at a process's start; Ray's processes inherit it): a trial computes in
# a thread of Tune's, and in a thread's own arena glibc unmaps and faults in its activations again and again
# (runner.engine.device.tune_allocator; measured on the demo: the trials' CPU time 8% lower, the sweep 63 -> 60 s);
# and Unix-socket connections to Ray's processes retried every 100 ms instead of every second (100 attempts: the
# same 10 s in all): the raylet connects to its object store as it starts, and when the store was not listening yet
# (a race between two of the raylet's threads) ray.init took a second longer (measured alone, `ray.init` 6 times:
# 4 took 2.7 s instead of 1.7 s; the raylet's log shows the second between the store's start and the object
# manager's). Ray sleeps this long between attempts (ConnectSocketRetry), and between a worker's requests for the
# system config. (A slow cluster test that failed with 50 ms, and so had this reverted once, failed as often
# without it: Tune killed actors that were still starting, fixed by runner.job.tuner.StartedStay.)
OWN_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_prestart_worker_first_driver": "0", "MALLOC_ARENA_MAX": "1",
               "RAY_raylet_client_connect_timeout_milliseconds": "100", "RAY_raylet_client_num_connect_attempts": "100"}


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
