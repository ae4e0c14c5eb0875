"""Real faults: a trial's Ray worker SIGKILLed, the driver SIGKILLed and the sweep resumed, the
grid or the checkpoint changed before --resume, two sweeps on one folder, an output folder that is read-only
or fills up. Nothing here is a simulated exception: processes are killed, file systems are really read-only
or full (small tmpfs mounts; those tests skip, visibly, where mounting is not allowed).

Where a process of its own is the thing under test (a kill, a signal, a second process holding the folder), the
sweep runs as `python scripts/sweep.py` in a subprocess; everything else calls the command in this process, on
the session's Ray, and tests that only need a finished sweep copy one that ran once for the module.
The long ones (a sweep of 272 points run several times) are marked slow; `.ci/run` runs them too.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from e2e_helpers import (CliRun, cli_env, e2e, finish, grid_dict, keys, measured, refused, resize_tmpfs, results,
    run_cli, start_cli, stop_group, tmpfs, trial_workers, values, wait_for_rows, write_grid)

from model import checkpoint as ckpt_io
from runner.errors import InputError
from runner.inputs import checkpoints

# 17 convs x 8 K x 2 criteria: trials long enough to be caught mid-way. Rankings from the weights only, so that
# every process ranks exactly alike and runs compare number for number.
FAULT_KS = [1, 2, 3, 4, 5, 6, 7, 8]
FAULT_CRITERIA = ["l1_norm", "random"]
FAULT_POINTS = 17 * len(FAULT_KS) * len(FAULT_CRITERIA)


def assert_whole_and_unique(folder: Path) -> list[tuple[str, str, int]]:
    """results.csv ends with a whole row, every row has every column, and no point appears twice."""
    text = (folder / "results.csv").read_text(encoding="utf-8")
    assert text.endswith("\n"), "results.csv ends with a cut row"
    header, *lines = text.splitlines()
    import csv

    widths = {len(row) for row in csv.reader(lines)}
    assert widths <= {len(header.split(","))}, f"rows of {widths} cells, header of {len(header.split(','))}"
    got = keys(results(folder))
    assert len(got) == len(set(got)), "a point appears twice"
    return got


@pytest.fixture(scope="module")
def fault_grid(sweep_checkpoint, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("faults")
    grid = grid_dict(tmp, e2e(sweep_checkpoint), name="faults", data={"eval_size": 200},
                     sweep={"layers": "all", "k": FAULT_KS, "criteria": FAULT_CRITERIA})
    return write_grid(tmp / "faults.yaml", grid)


@pytest.fixture(scope="module")
def reference(ray_session, fault_grid, tmp_path_factory):
    """The same sweep, uninterrupted (in this process): what every faulted run must end with."""
    from runner.job.sweep import Options, run_sweep

    out = tmp_path_factory.mktemp("reference")
    outcome = run_sweep(Options(str(fault_grid), output=str(out)))
    assert (outcome.points, outcome.expected, outcome.measured, outcome.failed) == (
        FAULT_POINTS, FAULT_POINTS, FAULT_POINTS, [])
    return values(out / "faults")


# ---- a trial's worker process killed mid-trial ----

@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_retried_and_every_point_lands_once(fault_grid, reference, tmp_path):
    started = time.time()
    proc = start_cli(["--grid", str(fault_grid), "--output", str(tmp_path)], cwd=tmp_path)
    folder = tmp_path / "faults"
    try:
        wait_for_rows(proc, folder, 20, started)
        busy = trial_workers(proc.pid)
        while not busy:  # (between two trials a reused worker is idle for a moment)
            assert proc.poll() is None and time.time() - started < 300, "no Ray worker ever ran a trial"
            time.sleep(0.02)
            busy = trial_workers(proc.pid)
        os.kill(busy[0], signal.SIGKILL)  # a real process death: Ray reports the actor lost, Tune retries
        run = finish(proc, started, 300)
    finally:
        stop_group(proc)
    assert run.returncode == 0, run.explain()
    retried = [line for line in run.err_lines if "failed; retrying from its last finished K" in line]
    assert len(retried) >= 1, run.explain()  # the killed worker's trial (and any queued on that actor)
    assert not [line for line in run.err_lines if "failed after its retries" in line], run.explain()
    assert sorted(assert_whole_and_unique(folder)) == sorted(reference)  # every point, exactly once
    assert values(folder) == reference  # and the numbers of the uninterrupted run


# ---- the driver killed, then --resume ----

@pytest.mark.slow
def test_driver_killed_then_resumed_recomputes_nothing(fault_grid, reference, tmp_path):
    args = ["--grid", str(fault_grid), "--output", str(tmp_path)]
    folder = tmp_path / "faults"
    started = time.time()
    proc = start_cli(args, cwd=tmp_path)
    try:
        wait_for_rows(proc, folder, 40, started)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: no handler runs, nothing is flushed or closed
        proc.wait(timeout=30)
        time.sleep(2)  # Ray's processes share the driver's fate; what lingers goes with the process group
    finally:
        stop_group(proc)
        proc.communicate()
    before = assert_whole_and_unique(folder)
    assert 40 <= len(before) < FAULT_POINTS

    resumed = run_cli([*args, "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.explain()
    # the resumed run evaluated exactly the points that were missing: none twice
    assert measured(resumed) == (FAULT_POINTS, FAULT_POINTS, FAULT_POINTS - len(before))
    assert set(before) <= set(assert_whole_and_unique(folder))
    assert values(folder) == reference
    assert "Trial " not in resumed.stdout, resumed.explain()  # Tune's own console lines stay quiet on restore


# ---- --resume after the grid or the checkpoint changed ----

PAIR = {"layers": ["layer1.0.conv1", "layer2.0.conv2"], "k": [1, 2], "criteria": ["l1_norm"]}
PAIR_NO_CRITERIA = {k: v for k, v in PAIR.items() if k != "criteria"}


def pair_grid(tmp: Path, checkpoint: Path, **sections) -> dict:
    return grid_dict(tmp, e2e(checkpoint), name="pair", sweep=PAIR, **sections)


@pytest.fixture(scope="module")
def finished_pair_once(ray_session, sweep_checkpoint, tmp_path_factory) -> Path:
    """A finished 4-point sweep on a checkpoint of its own (so that a test can change it), Tune's state in a folder
    of its own (shared/), run once in this process. Tests that change it get copies (`finished_pair`: what --resume
    checks is the grid, the checkpoint and results.csv, none of which names the folder); the one that restores Tune's
    state resumes it where it is (that state names the folders it was made for)."""
    from runner.job.sweep import Options, run_sweep

    tmp = tmp_path_factory.mktemp("pair")
    shutil.copy(sweep_checkpoint, tmp / "own.pt")
    grid = pair_grid(tmp, tmp / "own.pt", resources={"tune_storage": str(tmp / "shared")})
    outcome = run_sweep(Options(str(write_grid(tmp / "pair.yaml", grid))))
    assert (outcome.points, outcome.measured, outcome.failed) == (4, 4, [])
    return tmp


@pytest.fixture
def finished_pair(finished_pair_once, tmp_path):
    """A copy of the finished 4-point sweep in this test's folder: its grid, checkpoint and output folder."""
    checkpoint = tmp_path / "own.pt"
    shutil.copy(finished_pair_once / "own.pt", checkpoint)
    shutil.copytree(finished_pair_once / "runs", tmp_path / "runs")
    grid = pair_grid(tmp_path, checkpoint)
    path = write_grid(tmp_path / "pair.yaml", grid)
    folder = tmp_path / "runs" / "pair"
    return path, grid, folder, checkpoint, (folder / "results.csv").read_bytes()


def test_resume_refuses_a_changed_checkpoint(cli, finished_pair):
    path, _, folder, checkpoint, csv_before = finished_pair
    old = ckpt_io.sha256(checkpoint)
    loaded = checkpoints.load(checkpoint, "resnet18", 0.125, 10)
    with torch.no_grad():
        loaded.model.linear.bias[0] += 0.5  # one number changed: another checkpoint
    new = checkpoints.save(checkpoint, loaded.model, loaded.meta)
    line = refused(cli(["--grid", str(path), "--resume"], cwd=path.parent))
    assert line.startswith(f"error: --resume: the checkpoint changed since this sweep started (sha256 {old[:12]} "
                           f"then, {new[:12]} now): got '{folder}'")
    assert line.endswith("fix: restore them, or start a new sweep under another name or --output")
    assert (folder / "results.csv").read_bytes() == csv_before


@pytest.mark.parametrize("change, what", [
    ({"data": {"eval_size": 100}}, "the grid changed since this sweep started (data.eval_size: 150 then, 100 now)"),
    ({"sweep": {"target": "input"}},
     "the grid changed since this sweep started (sweep.target: 'output' then, 'input' now)"),
    ({"sweep": {"k": [1]}}, "the grid drops 2 recorded points (first: layer1.0.conv1, l1_norm, K=2)"),
])
def test_resume_refuses_a_grid_that_changes_or_drops_points(cli, finished_pair, change, what):
    path, grid, folder, _, csv_before = finished_pair
    for section, update in change.items():
        grid[section] = {**grid[section], **update}
    write_grid(path, grid)
    line = refused(cli(["--grid", str(path), "--resume"], cwd=path.parent))
    assert line.startswith(f"error: --resume: {what}: got '{folder}'")
    assert (folder / "results.csv").read_bytes() == csv_before


def test_resume_with_a_grid_that_only_adds_points_measures_only_those(cli, finished_pair):
    path, grid, folder, _, csv_before = finished_pair
    grid["sweep"] = {**grid["sweep"], "criteria": ["l1_norm", "random"], "k": [1, 2, 3]}
    write_grid(path, grid)
    run = cli(["--grid", str(path), "--resume"], cwd=path.parent)
    assert run.returncode == 0, run.explain()
    assert measured(run) == (12, 12, 8)  # 2 layers x 3 K x 2 criteria, of which 4 were done
    text = (folder / "results.csv").read_bytes()
    assert text.startswith(csv_before)  # the first rows untouched
    assert len(set(assert_whole_and_unique(folder))) == 12


@pytest.mark.parametrize("change, what", [
    ({"random_seed": 5}, "sweep.random_seed: 0 then, 5 now"),
    ({"random_repeats": 3}, "sweep.random_repeats: 1 then, 3 now"),
])
def test_resume_identity_holds_the_random_draws(tmp_path, change, what):
    """The random orders' seed and count are part of what a sweep is (checked in process: no sweep needed)."""
    from model.checkpoint import Checkpoint
    from runner.config import parse_grid
    from runner.inputs.trials import plan_trials
    from runner.job.folder import resume_check, write_config

    raw = grid_dict(tmp_path, name="draws", sweep={**PAIR_NO_CRITERIA, "criteria": ["random"]})
    grid = parse_grid(raw, "g")
    grid.folder.mkdir(parents=True)
    write_config(grid, plan_trials(grid), Checkpoint(None, {}, "0" * 64, "m.pt"), "tune", "sweep-id")
    assert resume_check(grid, plan_trials(grid), "0" * 64)[1] is False  # the same sweep
    raw["sweep"] = {**raw["sweep"], **change}
    changed = parse_grid(raw, "g")
    with pytest.raises(InputError) as err:
        resume_check(changed, plan_trials(changed), "0" * 64)
    assert str(err.value).startswith(f"--resume: the grid changed since this sweep started ({what}): ")


# ---- two sweeps on one output folder ----

@pytest.mark.slow
def test_a_second_sweep_on_the_same_folder_is_refused(cli, ray_session, sweep_checkpoint, tmp_path):
    """Two sweeps on one folder, in two processes: one runs here; `python scripts/sweep.py` on the same folder,
    started once this one holds it, is refused (exit 2, one line) and this one's results stay whole."""
    path = write_grid(tmp_path / "pair.yaml", pair_grid(tmp_path, sweep_checkpoint))
    folder = tmp_path / "runs" / "pair"
    held, done = f"pid {os.getpid()} ", threading.Event()

    def second_once_the_folder_is_held() -> CliRun | None:
        while not done.is_set():
            if (folder / ".lock").is_file() and (folder / ".lock").read_text().startswith(held):
                return run_cli(["--grid", str(path)], cwd=tmp_path)
            time.sleep(0.01)
        return None

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(second_once_the_folder_is_held)
        try:
            first = cli(["--grid", str(path)], cwd=tmp_path)
        finally:
            done.set()
        second = waiting.result(timeout=300)
    assert first.returncode == 0, first.explain()
    assert second is not None, "the second sweep never started: " + first.explain()
    assert refused(second).startswith((f"error: output: another sweep is running in this folder ({held}",
                                       "error: output: this folder already holds results")), second.explain()
    assert len(assert_whole_and_unique(folder)) == 4


# ---- an output folder that is read-only, or fills up ----

def test_a_read_only_output_folder_is_one_line_and_exit_2(cli, sweep_checkpoint, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        path = write_grid(tmp_path / "pair.yaml", pair_grid(tmp_path, sweep_checkpoint, output=str(ro / "runs")))
        assert refused(cli(["--grid", str(path)], cwd=tmp_path)) == (
            f"error: output: cannot write there (Read-only file system): got '{ro}/runs/pair'; allowed: a folder you "
            "can write to; fix: choose another --output, or fix the folder's permissions")
@pytest.mark.slow
def test_a_full_disk_stops_the_sweep_cleanly_and_resume_finishes_it(fault_grid, reference, tmp_path):
    with tmpfs(tmp_path / "small", "2m") as small:
        args = ["--grid", str(fault_grid), "--output", str(small)]
        run = run_cli(args, cwd=tmp_path, env=cli_env())
        folder = small / "faults"
        assert run.returncode == 1, run.explain()
        assert "Traceback" not in run.stderr and "Logging error" not in run.stderr, run.explain()
        assert run.err_lines[-1].startswith("error: output: no space left on device while writing "
                                            f"{folder}/"), run.explain()
        assert run.err_lines[-1].endswith("fix: make room or fix the folder, then run the same command with "
                                          "--resume"), run.explain()
        done = assert_whole_and_unique(folder)  # what was written before the disk filled is whole
        assert 0 < len(done) < FAULT_POINTS
        assert {k: v for k, v in values(folder).items()} == {k: reference[k] for k in done}
        assert not list(folder.rglob(".*.tmp*")), "a half-written file was left behind"
        from PIL import Image

        for png in (folder / "feature_maps").rglob("*.png"):
            with Image.open(png) as image:
                image.verify()  # every figure we wrote is a whole PNG (W&B's own media copies are its business)

        resize_tmpfs(small, "64m")  # room made: the same command with --resume finishes the sweep
        resumed = run_cli([*args, "--resume"], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.explain()
        assert measured(resumed)[:2] == (FAULT_POINTS, FAULT_POINTS)
        assert values(folder) == reference


# ---- Tune's state elsewhere (a cluster's shared folder or a cloud URI): resume reads it from there ----

def test_tune_state_in_its_own_storage_and_resume_restores_from_it(cli, finished_pair_once):
    """The module's finished sweep keeps Tune's state in shared/, and is resumed where it is: it measures nothing and
    changes no result, so the copies other tests make of it stay a finished sweep."""
    folder = finished_pair_once / "runs" / "pair"
    experiments = sorted((finished_pair_once / "shared" / "pair").glob("tune-*"))
    assert len(experiments) == 1 and list(experiments[0].glob("experiment_state-*.json"))
    assert not list(folder.glob("tune*"))  # nothing of Tune's in the output folder
    before = (folder / "results.csv").read_bytes()
    again = cli(["--grid", str(finished_pair_once / "pair.yaml"), "--resume"], cwd=finished_pair_once)
    assert again.returncode == 0, again.explain()
    assert f"resuming from Tune's state in {experiments[0]}" in again.stderr, again.explain()
    assert measured(again) == (4, 4, 0)
    assert (folder / "results.csv").read_bytes() == before
