"""Scale-out: a real three-node Ray cluster on this machine (tests/ray_cluster.py, a side process
running `ray.cluster_utils.Cluster`: a head and two worker nodes, each its own raylet and object store, all on
127.0.0.1), joined with `--address` exactly as a user joins theirs. Trials spread over the nodes, results and
W&B runs land on the driver's side, the checkpoint travels through the object store, and a node lost
mid-sweep costs only retries. Marked slow (a cluster start and two sweeps, about two minutes).
"""

from __future__ import annotations

import json
import select
import uuid
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from e2e_helpers import (ROOT, cli_env, e2e, finish, grid_dict, keys, measured, results, run_cli, start_cli, stop_group,
    wait_for_rows, wandb_run_dirs, write_grid)

from runner.job.ray_env import LOCAL_RAY_ENV, OWN_RAY_ENV, RAY_ENV, on_loopback

pytestmark = pytest.mark.slow

KS = [1, 2, 3, 4, 5, 6, 7, 8]
CRITERIA = ["l1_norm", "random"]
POINTS = 17 * len(KS) * len(CRITERIA)


class SideCluster:
    def __init__(self, nodes: int, plain: bool = False, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "ray_cluster.py"), str(nodes),
                                      *(["--plain"] if plain else [])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env or cli_env(), start_new_session=True)
        first = self.read(180)
        self.address: str = first["address"]
        self.nodes: list[str] = first["nodes"]
        self.session = Path(first["session"])

    def read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise AssertionError(f"the cluster side process said nothing in {timeout:.0f} s:\n"
                                 f"{self.proc.stderr.read()[-3000:]}")
        return json.loads(line)

    def remove_node(self) -> str:
        self.proc.stdin.write("remove\n")
        self.proc.stdin.flush()
        return self.read(120)["removed"]

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            pass
        stop_group(self.proc)


@pytest.fixture(scope="module")
def cluster():
    side = SideCluster(3)
    try:
        yield side
    finally:
        side.close()


def cluster_grid(tmp: Path, checkpoint: Path) -> Path:
    return write_grid(tmp / "cluster.yaml", grid_dict(tmp, e2e(checkpoint), name="cluster", data={"eval_size": 200},
                                                      sweep={"layers": "all", "k": KS, "criteria": CRITERIA}))


def sweep_on(cluster: SideCluster, checkpoint: Path, tmp: Path, after_rows: int, during) -> tuple:
    """The sweep through the CLI on the cluster; `during()` runs once `after_rows` results are in."""
    started = time.time()
    proc = start_cli(["--grid", str(cluster_grid(tmp, checkpoint)), "--address", cluster.address], cwd=tmp)
    folder = tmp / "runs" / "cluster"
    try:
        wait_for_rows(proc, folder, after_rows, started)
        seen = during()
        run = finish(proc, started, 400)
    finally:
        stop_group(proc)
    assert run.returncode == 0, run.explain()
    rows = results(folder)
    assert len(rows) == len(set(keys(rows))) == POINTS  # every point, once
    return run, folder, rows, seen


def test_trials_run_on_every_node_and_everything_lands_on_the_driver(cluster, sweep_checkpoint, tmp_path):
    checkpoint = tmp_path / "own.pt"
    shutil.copy(sweep_checkpoint, checkpoint)
    # the file is gone once the first point is in: trials still starting on any node get the weights from the
    # object store, never from a path
    run, folder, rows, _ = sweep_on(cluster, checkpoint, tmp_path, 1,
                                    lambda: checkpoint.rename(tmp_path / "moved.pt"))
    assert f"joined the Ray cluster at {cluster.address}: 3 node(s), 3 CPUs" in run.stderr, run.explain()
    nodes = Counter(r["node"] for r in rows)
    assert set(nodes) <= {n[:12] for n in cluster.nodes}
    assert len(nodes) == 3, nodes  # trials ran on every node (1 CPU each)
    # results, W&B runs, figures and report all written by the driver, in its folder
    assert len(wandb_run_dirs(folder)) == 17 * len(CRITERIA) + 1
    assert (folder / "report.md").is_file() and (folder / "plots" / "accuracy_vs_k.png").is_file()
    assert measured(run) == (POINTS, POINTS, POINTS)


def test_a_node_lost_mid_sweep_costs_only_retries(cluster, sweep_checkpoint, tmp_path):
    # raylet, object store and workers of a worker node killed at once, while its trial runs
    run, _, _, _ = sweep_on(cluster, sweep_checkpoint, tmp_path, 30, cluster.remove_node)
    # the trial that was running there failed, and its retry (elsewhere) measured what it had left
    assert any("failed; retrying from its last finished K" in line for line in run.err_lines), run.explain()
    assert not any("failed after its retries" in line for line in run.err_lines), run.explain()


# ---- joining a cluster started the way its owner starts it (not with our environment) ----

def plain_env(home: Path, **extra: str) -> dict[str, str]:
    """A user's shell: none of the settings the sweep gives a Ray of its own (RAY_AUTH_MODE above all), and a home
    of its own (where Ray keeps its token)."""
    ours = set(RAY_ENV) | set(LOCAL_RAY_ENV) | set(OWN_RAY_ENV)
    env = {k: v for k, v in cli_env().items() if k not in ours}
    return {**env, "HOME": str(home), **extra}


@pytest.fixture(scope="module", params=["default", "token"])
def plain_cluster(request, tmp_path_factory):
    """A two-node cluster with Ray's default authentication, or with token authentication (the token in the
    owner's ~/.ray/auth_token; RAY_AUTH_MODE=token for the cluster and, as Ray asks of every client, for the
    driver)."""
    home = tmp_path_factory.mktemp(f"home-{request.param}")
    auth = {}
    if request.param == "token":
        (home / ".ray").mkdir()
        (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex)
        auth = {"RAY_AUTH_MODE": "token"}
    side = SideCluster(2, plain=True, env=plain_env(home, **auth))
    try:
        yield side, plain_env(home, **auth)
    finally:
        side.close()


def test_joining_a_cluster_started_without_our_environment(plain_cluster, sweep_checkpoint, tmp_path):
    side, env = plain_cluster
    assert "RAY_AUTH_MODE" not in env or env["RAY_AUTH_MODE"] == "token"  # never ours ("disabled")
    assert not on_loopback(side.address)  # the machine's address: the driver joins as it would a real cluster
    grid = write_grid(tmp_path / "join.yaml", grid_dict(tmp_path, e2e(sweep_checkpoint), name="join", sweep={
        "layers": ["layer1.0.conv1", "layer2.0.conv2"], "k": [1, 2], "criteria": ["l1_norm"]}))
    run = run_cli(["--grid", str(grid), "--address", side.address], cwd=tmp_path, env=env, timeout=400)
    assert run.returncode == 0, run.explain()
    assert f"joined the Ray cluster at {side.address}: 2 node(s), 2 CPUs" in run.stderr, run.explain()
    assert measured(run) == (4, 4, 4)
    assert {r["node"] for r in results(tmp_path / "runs" / "join")} <= {n[:12] for n in side.nodes}
    # the code reached the nodes as Ray's runtime_env py_modules (packed, uploaded, unpacked by the cluster)
    shipped = sorted(side.session.glob("runtime_resources/py_modules_files/*/runner/job/trial.py")) + sorted(
        side.session.glob("runtime_resources/py_modules_files/*/model/resnet.py"))
    assert len(shipped) >= 2, sorted(p.relative_to(side.session) for p in side.session.glob("runtime_resources/*/*"))
