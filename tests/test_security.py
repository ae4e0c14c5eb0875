"""Security: a local Ray listens on 127.0.0.1 only, with no dashboard unless asked for; a W&B key
never lands in anything the sweep writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from e2e_helpers import CliRun, descendants

LOOPBACK = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")  # the last: IPv4 loopback on a dual-stack socket
START_RAY = """
import json, os, sys
sys.path.insert(0, {root!r})
from runner.job.ray_env import set_ray_env
set_ray_env(None)  # Ray's environment, before Ray is imported
import ray
from runner.job import cluster
cluster.start_ray(None, dashboard={dashboard})
print(json.dumps({{"pid": os.getpid(), "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
                  "gcs": ray.get_runtime_context().gcs_address}}), flush=True)
sys.stdin.readline()
ray.shutdown()
"""


def _listening(pids: set[int]) -> list[str]:
    """host:port of every TCP listener owned by one of `pids` (from `ss`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            found.append(line.split()[3])
    return found


def _local_ray(dashboard: bool) -> tuple[dict, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", START_RAY.format(root=str(ROOT), dashboard=dashboard)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        while line and not line.startswith("{"):  # Ray may print its own lines first
            line = proc.stdout.readline()
        info = json.loads(line)
        listeners = _listening({info["pid"], *descendants(info["pid"])})
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    return info, listeners


def test_local_ray_binds_loopback_only_and_has_no_dashboard(ray_session) -> None:
    """The session's Ray, started as the command starts its own (runner.job.cluster.start_ray), and everything
    this process started: every listening socket on loopback, no dashboard."""
    import ray

    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    listeners = _listening({os.getpid(), *descendants(os.getpid())})
    assert listeners, "found no Ray listeners to check"
    assert all(addr.startswith(LOOPBACK) for addr in listeners), listeners
    assert not any(addr.endswith(":8265") for addr in listeners)


def test_dashboard_when_asked_is_on_loopback_too() -> None:
    try:
        import aiohttp  # noqa: F401  one of the packages ray[default] adds for the dashboard
    except ImportError:
        done = subprocess.run([sys.executable, "-c", START_RAY.format(root=str(ROOT), dashboard=True)],
                              capture_output=True, text=True, input="\n", timeout=120)
        assert "InputError: resources.ray_dashboard: Ray's dashboard needs packages that are not installed" in \
            done.stderr
        return
    info, listeners = _local_ray(dashboard=True)
    assert "127.0.0.1:8265" in listeners
    assert all(addr.startswith(LOOPBACK) for addr in listeners), listeners


def key_leaks(run: CliRun, output: Path, started: float, key: str) -> list[str]:
    """Where a sweep run as its own process wrote `key`: its output, what it printed, and its Ray's own logs."""
    assert run.returncode == 0, run.explain()
    written = [p for p in output.rglob("*") if p.is_file()]
    assert any(p.name == "results.csv" for p in written) and any(p.suffix == ".wandb" for p in written)
    # and Ray's own logs of this run (its session folders started since)
    sessions = [d for d in (Path(os.environ["RAY_TMPDIR"]) / "ray").glob("session_2*")  # (see conftest.py)
                if d.is_dir() and d.stat().st_mtime >= started - 1]
    assert sessions, "no Ray session folder from this run"
    written += [p for d in sessions for p in d.rglob("*") if p.is_file() and not p.is_symlink()]
    return [str(p) for p in written if key.encode() in p.read_bytes()] + \
        (["stdout or stderr"] if key in run.stdout + run.stderr else [])


@pytest.mark.slow
def test_wandb_key_appears_in_nothing_the_sweep_writes(script_sweep) -> None:
    """The script's sweep (conftest.py): a process and a Ray of its own, so that its Ray (and that Ray's logs) start
    with the key in the environment; W&B on auto with that key, so online, and no server there, so the offline runs
    written after the fallback hold whatever W&B keeps of a run."""
    assert key_leaks(script_sweep.run, script_sweep.folder, script_sweep.started, script_sweep.key) == []
