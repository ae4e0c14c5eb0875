"""Ray that says why it waits (runner.job.resources, runner.job.cluster): every trial's request is checked against
the cluster before any trial starts. A request no node can ever fit is one line and exit 2; on an autoscaling
cluster the sweep says it waits for a node, with the request; Tune's own warnings reach the console, its
per-trial chatter does not."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading

import pytest
import yaml
from e2e_helpers import CliRun, e2e, grid_dict, write_grid

from runner.config import ResourcesConfig
from runner.errors import InputError
from runner.job.resources import Nodes, autoscaler_node_types, bootstrap_node_types, trial_request, verdict

ONE_CPU = {"cpu": 1.0, "gpu": 0.0}
ONE_GPU = {"cpu": 1.0, "gpu": 1.0}


@pytest.mark.parametrize("gpus, cluster_gpus, expected", [
    ("auto", 0, {"cpu": 2.0, "gpu": 0.0}), ("auto", 8, {"cpu": 2.0, "gpu": 0.25}), (1, 0, {"cpu": 2.0, "gpu": 1.0}),
    (0.5, 2, {"cpu": 2.0, "gpu": 0.5})])
def test_trial_request(gpus, cluster_gpus, expected):
    assert trial_request(ResourcesConfig(cpus_per_trial=2, gpus_per_trial=gpus), cluster_gpus) == expected


@pytest.mark.parametrize("request_, sizes", [(ONE_CPU, [(2, 0)]), (ONE_GPU, [(2, 0), (4, 1)]),
                                             ({"cpu": 4, "gpu": 0.25}, [(4, 1)])])
def test_a_request_some_node_fits_passes(request_, sizes):
    assert verdict(request_, Nodes(tuple(sizes), autoscaling=False), 3) is None


def test_gpus_on_a_cluster_without_gpus_are_refused():
    with pytest.raises(InputError) as e:
        verdict(ONE_GPU, Nodes(((2, 0),), autoscaling=False), 6)
    assert str(e.value) == (
        "resources.gpus_per_trial: no node of the Ray cluster has that many GPUs (1 node(s), not autoscaling, at "
        "most 2 CPUs and 0 GPUs on a node): got 1; allowed: 0 or auto (no node has a GPU); fix: set "
        "resources.gpus_per_trial: auto, or join a cluster with GPUs (--address)")


def test_more_cpus_than_any_node_are_refused():
    with pytest.raises(InputError) as e:
        verdict({"cpu": 16, "gpu": 0}, Nodes(((2, 0), (8, 1)), autoscaling=False), 6)
    assert str(e.value) == (
        "resources.cpus_per_trial: no node of the Ray cluster has that many CPUs (2 node(s), not autoscaling, at "
        "most 8 CPUs and 1 GPUs on a node): got 16; allowed: at most 8; fix: set resources.cpus_per_trial to 8 or "
        "less, or join a cluster with bigger nodes (--address)")


def test_cpus_and_gpus_that_no_single_node_has_together_are_refused():
    with pytest.raises(InputError) as e:
        verdict({"cpu": 8, "gpu": 1}, Nodes(((8, 0), (2, 1)), autoscaling=False), 6)
    assert e.value.field == "resources" and "no single node of the Ray cluster has both" in str(e.value)


def test_an_autoscaling_cluster_waits_for_a_node_and_says_so():
    line = verdict(ONE_GPU, Nodes(((2, 0),), autoscaling=True), 6)
    assert line == ("resources: no node of the cluster can run a trial yet (1 node(s), at most 2 CPUs and 0 GPUs on "
                    "a node); the cluster autoscales, so the trials wait for it to add one: 6 trial(s), each asking "
                    "for {CPU: 1, GPU: 1} (`ray status` shows the request)")
    # the node types it may add are known (cluster launcher) and one fits: wait
    assert verdict(ONE_GPU, Nodes(((2, 0),), True, ((4, 0), (8, 1))), 6) is not None


def test_an_autoscaler_with_no_node_type_that_fits_is_refused():
    with pytest.raises(InputError) as e:
        verdict(ONE_GPU, Nodes(((2, 0),), True, ((4, 0), (16, 0))), 6)
    assert "and no node type of its autoscaler fits either" in str(e.value)


READONLY_STATUS = {"autoscaler_report": {  # a hand-started cluster: Ray's monitor in read-only mode
    "active_nodes": {"node_9a83d891": 1}, "pending_launches": {}, "node_type_mapping": {"9a83d891": "node_9a83d891"}}}
SCALING_STATUS = {"autoscaler_report": {  # the cluster launcher's autoscaler
    "active_nodes": {"ray.head.default": 1}, "pending_launches": {"gpu_worker": 1},
    "node_type_mapping": {"abc": "ray.head.default"}}}


def test_autoscaler_status_tells_a_config_from_the_read_only_mirror():
    assert autoscaler_node_types(READONLY_STATUS) == []
    assert autoscaler_node_types(SCALING_STATUS) == ["gpu_worker", "ray.head.default"]
    assert autoscaler_node_types(None) == [] and autoscaler_node_types({}) == []


def test_bootstrap_config_node_types(tmp_path):
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump({"available_node_types": {
        "head": {"resources": {"CPU": 4}}, "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 4}}}))
    assert sorted(bootstrap_node_types(str(path))) == [(4.0, 0.0), (8.0, 1.0)]
    path.write_text(yaml.safe_dump({"available_node_types": {"cpu": {"node_config": {}}}}))  # resources unknown
    assert bootstrap_node_types(str(path)) is None
    assert bootstrap_node_types(str(tmp_path / "none.yaml")) is None


# ---- against a running Ray (the session's: 1 node, 2 CPUs, no GPU) ----

def test_check_against_the_running_cluster(ray_session):
    from runner.job.resources import check_fit

    assert check_fit(ResourcesConfig(cpus_per_trial=2), 4) == {"cpu": 2.0, "gpu": 0.0}
    with pytest.raises(InputError) as e:
        check_fit(ResourcesConfig(cpus_per_trial=3), 4)
    assert e.value.field == "resources.cpus_per_trial" and "allowed: at most 2;" in str(e.value)
    with pytest.raises(InputError) as e:
        check_fit(ResourcesConfig(gpus_per_trial=1), 4)
    assert e.value.field == "resources.gpus_per_trial"


def test_check_on_a_cluster_launcher_head_waits_and_says_so(ray_session, tmp_path, monkeypatch, caplog):
    """The cluster launcher leaves ~/ray_bootstrap_config.yaml on an autoscaling head (Tune's own test)."""
    from runner.job.resources import check_fit

    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump({"available_node_types": {
        "head": {"resources": {"CPU": 2}}, "gpu": {"resources": {"CPU": 8, "GPU": 1}}}}))
    monkeypatch.setenv("HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="runner.job.resources"):
        assert check_fit(ResourcesConfig(gpus_per_trial=1), 4) == {"cpu": 1.0, "gpu": 1.0}
    assert [r.getMessage() for r in caplog.records if "autoscales" in r.getMessage()] == [
        "resources: no node of the cluster can run a trial yet (1 node(s), at most 2 CPUs and 0 GPUs on a node); "
        "the cluster autoscales, so the trials wait for it to add one: 4 trial(s), each asking for {CPU: 1, GPU: 1} "
        "(`ray status` shows the request)"]


def test_tune_warnings_reach_the_console_but_not_its_per_trial_chatter():
    from runner.job.cluster import quiet_tune_chatter

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    ray_logger = logging.getLogger("ray")  # Ray's own console handler hangs here (it does not propagate)
    keep, level = Keep(), ray_logger.level
    ray_logger.addHandler(keep)
    ray_logger.setLevel(logging.WARNING)
    try:
        quiet_tune_chatter()
        quiet_tune_chatter()  # twice: one filter
        logging.getLogger("ray.tune.execution.insufficient_resources_manager").warning("No trial is running ...")
        logging.getLogger("ray.tune.tune").warning("Tune detects GPUs, but no trials are using GPUs.")
        logging.getLogger("ray.tune.execution.tune_controller").error("Trial task failed for trial t1")
        logging.getLogger("ray.tune.tune").error("Trials did not complete: [t1]")
        logging.getLogger("ray.tune.tune").warning("Experiment has been interrupted, but the most recent state ...")
        logging.getLogger("ray.tune.execution.tune_controller").info("an info line")
    finally:
        ray_logger.removeHandler(keep)
        ray_logger.setLevel(level)
    assert seen == ["No trial is running ...", "Tune detects GPUs, but no trials are using GPUs."]
    assert len(logging.getLogger("ray.tune.tune").filters) == 1


# ---- the command ----

def test_an_impossible_resource_request_exits_2_with_one_line_within_seconds(cli, ray_session, sweep_checkpoint,
                                                                            tmp_path):
    grid = write_grid(tmp_path / "g.yaml", grid_dict(tmp_path, e2e(sweep_checkpoint), name="gpu", sweep={
        "layers": ["conv1"], "k": [1], "criteria": ["l1_norm"]}))
    # the command against the session's Ray, in a thread with a time limit: Tune waiting for a node that never comes
    # fails the test instead of hanging the run
    done: list[CliRun] = []
    command = threading.Thread(target=lambda: done.append(cli(
        ["--grid", str(grid), "--set", "resources.gpus_per_trial=64"], cwd=tmp_path)), daemon=True)
    command.start()
    command.join(timeout=120)
    assert done, "no answer in 120 s: the sweep waits for resources no node has"
    [run] = done
    assert run.returncode == 2, run.explain()
    assert len(run.err_lines) == 1 and re.fullmatch(
        r"error: --set resources.gpus_per_trial=64: resources.gpus_per_trial: no node of the Ray cluster has that "
        r"many GPUs \(1 node\(s\), not autoscaling, at most \d+ CPUs and \d+ GPUs on a node\): got 64; allowed: "
        r"(0 or auto \(no node has a GPU\)|at most \d+, or auto); fix: set resources.gpus_per_trial: auto, or join a "
        r"cluster with GPUs \(--address\)", run.err_lines[0]), run.explain()
    assert run.stdout == ""
    assert not (tmp_path / "runs").exists()  # refused before the output folder is made


# ---- joining a cluster: its authentication is its own ----

@pytest.mark.parametrize("address", ["192.0.2.7:6379", "127.0.0.1:6379", "ray://head:10001", "auto"])
def test_joining_a_cluster_never_sets_its_auth_mode(address):
    from runner.job.ray_env import ray_env

    assert "RAY_AUTH_MODE" not in ray_env(address)
    assert ray_env(None)["RAY_AUTH_MODE"] == "disabled"  # only a Ray this process starts itself, on loopback


def test_code_is_shipped_to_the_nodes_unless_the_job_already_ships_py_modules(monkeypatch):
    from runner.job.cluster import CHECKOUT, code_env

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = code_env()
    assert env["py_modules"] == [str(CHECKOUT / "model"), str(CHECKOUT / "runner")]
    assert (CHECKOUT / "runner" / "job" / "trial.py").is_file() and "__pycache__" in env["excludes"]
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "."}}')
    assert code_env()["py_modules"]  # ours is added to the job's working_dir
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"py_modules": ["pkg"]}}')
    assert code_env() == {}  # Ray refuses two py_modules: the job's wins


# ---- one malloc arena per process: a trial computes in a thread of Tune's ----

ARENAS = """
import ctypes, os, sys, tempfile, threading
import numpy as np
{setup}
t = threading.Thread(target=lambda: np.ones(250_000))  # 2 MB, allocated and freed in a thread of its own
t.start()
t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
fd, path = tempfile.mkstemp()
f = ctypes.c_void_p(libc.fopen(path.encode(), b"w"))
libc.malloc_info(0, f)
libc.fclose(f)
print(open(path).read().count("<heap nr="))  # glibc's arenas in use
os.remove(path)
"""


def arenas(setup: str, env: dict[str, str]) -> int:
    """glibc's arenas in a fresh Python process after `setup` and one thread's allocation."""
    done = subprocess.run([sys.executable, "-c", ARENAS.format(setup=setup)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_threads_allocate_from_the_one_main_arena():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    tuned = "from runner.engine.device import tune_allocator\nassert tune_allocator()"
    assert arenas("", env) == 2  # glibc's default: the thread got an arena of its own
    assert arenas(tuned, env) == 1
    assert arenas("", env | {"MALLOC_ARENA_MAX": "1"}) == 1  # what a Ray the sweep starts gives its workers


def test_a_ray_the_sweep_starts_gives_its_processes_one_arena_and_quick_socket_retries(ray_session):
    import ray

    from runner.job.ray_env import ray_env

    ours = {"MALLOC_ARENA_MAX": "1", "RAY_raylet_client_connect_timeout_milliseconds": "100",
            "RAY_raylet_client_num_connect_attempts": "100"}
    assert ours.items() <= ray_env(None).items()
    assert not set(ours) & set(ray_env("10.0.0.5:6379"))  # a cluster we join keeps its own environment

    @ray.remote(num_cpus=0)
    def environment() -> dict[str, str | None]:
        import os

        return {key: os.environ.get(key) for key in ours}

    assert ray.get(environment.remote()) == ours


# ---- which pending trial an actor that finished its trial takes (runner.job.tuner.StartedStay) ----

def fake_controller(placed: set[str], statuses: dict[str, str]):
    """What StartedStay reads of Tune's controller: its trials in order, each trial's actor, and the actors Ray
    has placed on a node."""
    from types import SimpleNamespace

    class FakeTrial:  # hashable by identity, as Tune's trials are
        def __init__(self, name: str, status: str) -> None:
            self.name, self.status = name, status

    trials = [FakeTrial(name, status) for name, status in statuses.items()]
    actors = {t: f"actor-{t.name}" for t in trials if t.status != "TERMINATED"}
    live = {f"actor-{name}": object() for name in placed}
    return SimpleNamespace(get_trials=lambda: trials, _trial_to_actor=actors,
                           _actor_manager=SimpleNamespace(_live_actors_to_ray_actors_resources=live))


def test_a_trial_whose_actor_is_starting_on_a_node_is_left_to_it():
    from runner.job.tuner import StartedStay

    chosen = StartedStay().choose_trial_to_run
    # a and b finished or run; c's and d's actors are starting on nodes; e's waits for a CPU: e is handed over
    controller = fake_controller({"b", "c", "d"}, {"a": "TERMINATED", "b": "RUNNING", "c": "PENDING",
                                                   "d": "PENDING", "e": "PENDING", "f": "PENDING"})
    assert chosen(controller).name == "e"
    assert chosen(fake_controller({"c"}, {"c": "PENDING", "d": "PAUSED"})).name == "d"
    assert chosen(fake_controller({"c"}, {"c": "PENDING"})) is None  # nothing to hand over: c's actor starts it
    # Tune's plain FIFO order where nothing is placed yet
    assert chosen(fake_controller(set(), {"a": "RUNNING", "c": "PENDING", "d": "PENDING"})).name == "c"


def test_started_stay_reads_past_the_wrapper_tune_hands_a_scheduler(monkeypatch):
    """Tune wraps its controller for a scheduler and warns on the console when a private field is read through
    the wrapper: StartedStay reads the controller inside."""
    from ray.tune.execution import tune_controller

    from runner.job.tuner import StartedStay

    warned = []
    monkeypatch.setattr(tune_controller.logger, "warning", lambda msg, *a, **k: warned.append(msg))
    monkeypatch.setattr(tune_controller, "log_once", lambda key: True)  # every time, not once per process
    inner = fake_controller({"c"}, {"c": "PENDING", "d": "PENDING"})
    wrapped = tune_controller.TrialRunnerWrapper(inner, trial_executor=None, runner_whitelist_attr={"get_trials"})
    wrapped._actor_manager  # noqa: B018  read through the wrapper: warned
    assert len(warned) == 1 and "restricted" in warned[0]
    assert StartedStay().choose_trial_to_run(wrapped).name == "d"
    assert len(warned) == 1  # StartedStay read nothing through it


def test_tune_keeps_the_fields_started_stay_reads():
    """StartedStay reads two of Tune's private fields; if a Ray release moves them it quietly becomes Tune's own
    FIFO order again, so this fails first. It guards our workaround runner.job.tuner.StartedStay (a starting
    actor keeps the trial it was started for), which reads these fields."""
    import inspect

    from ray.air.execution._internal import RayActorManager
    from ray.tune.execution.tune_controller import TrialRunnerWrapper, TuneController

    assert "self._tune_controller = tune_controller" in inspect.getsource(TrialRunnerWrapper.__init__)
    assert "self._trial_to_actor" in inspect.getsource(TuneController.__init__)
    assert "self._actor_manager" in inspect.getsource(TuneController.__init__)
    assert "self._live_actors_to_ray_actors_resources" in inspect.getsource(RayActorManager.__init__)


def test_the_heap_is_frozen_for_the_trials_and_unfrozen_after(monkeypatch):
    """runner.job.cluster.heap_frozen: what exists on entry is out of the collector's scans (stop_ray's full
    collection then scans only what the trials made) and back in them afterwards, also when the block fails;
    garbage made inside is still collected. A process that froze objects itself keeps them frozen."""
    import gc

    from runner.job.cluster import heap_frozen

    gc.unfreeze()
    with pytest.raises(RuntimeError):
        with heap_frozen():
            assert gc.get_freeze_count() > 0
            cycle: list = []
            cycle.append(cycle)
            del cycle
            assert gc.collect() >= 1  # made inside the block: collected
            raise RuntimeError("a failed sweep")
    assert gc.get_freeze_count() == 0
    # the process's own freeze: heap_frozen neither freezes more nor unfreezes (the count itself can fall
    # meanwhile, as other threads free frozen objects, so the calls are what is checked)
    calls = []
    freeze, unfreeze = gc.freeze, gc.unfreeze
    gc.freeze()
    try:
        monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
        monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
        with heap_frozen():
            assert gc.get_freeze_count() > 0
        assert calls == [] and gc.get_freeze_count() > 0
    finally:
        monkeypatch.undo()
        unfreeze()
    assert gc.freeze is freeze
