"""The prune job killed and resumed, as on a cluster (slow group): the command in a process group of its own,
SIGKILLed (the whole group, Ray's processes included) after its first plan.json and again while fine-tuning,
resumed to the end each time; compared with the same job run without a stop. Then a budget added with --resume,
and a `sweep --resume` that keeps the report's plans section. (tests/test_prune.py has a smaller one in the
default group.)"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from e2e_helpers import ROOT, cli_env, write_grid

SWEEP_FILES = ("results.csv", "rankings.json", "config.yaml", "report.md")
TIMING = ("folder",)  # with every column whose name says latency
EPOCH = re.compile(r"fine-tuning (\S+): epoch (\d+) of (\d+),")


def scenario_grid(tmp: Path) -> dict:
    """The demo's data and model (its checkpoint trained for one epoch), 3,000 training images, swept by groups
    (2 K, l1_norm); budget macs 0.6 by knapsack, threshold and uniform; 3 epochs of fine-tuning."""
    demo = yaml.safe_load((ROOT / "sweeps" / "demo.yaml").read_text(encoding="utf-8"))
    return {**demo, "name": "resumed", "output": str(tmp / "sweep"),
            "data": {**demo["data"], "train_size": 3000},
            "checkpoint": {"path": str(tmp / "demo.pt"), "train": {**demo["checkpoint"]["train"], "epochs": 1}},
            "sweep": {"layers": "all", "unit": "group", "k": {"fractions": [0.25, 0.5]}, "criteria": ["l1_norm"]},
            "plan": {"budgets": [{"macs": 0.6}], "methods": ["knapsack", "threshold", "uniform"],
                     "finetune": {"epochs": 3}},
            "resources": {"cpus_per_trial": 1}, "wandb": {"mode": "offline"}}


def start(command: str, grid: Path, output: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`python -m runner.cli COMMAND` in a process group of its own, its output (the log included) to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "runner.cli", command, "--grid", str(grid), "--output",
                                 str(output), *extra], cwd=output, env=cli_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 1800) -> None:
    """SIGKILL the whole process group once `ready()` holds (polled every 0.1 s)."""
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before {what}"
            assert time.time() < deadline, f"no {what} after {timeout:.0f} s"
            time.sleep(0.1)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    time.sleep(1)  # what Ray left goes with its group


def finished(proc: subprocess.Popen, log: Path, timeout: float = 3600) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode == 0, text[-5000:]
    return text


def fingerprints(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Each plan.json: (inode, mtime in ns, sha256): a file written again changes at least one of them."""
    return {p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.glob("plans/*/plan.json"))}


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=[c for c in table.columns if c in TIMING or "latency" in c])


def epochs_logged(*texts: str) -> list[tuple[str, int]]:
    return [(m[1], int(m[2])) for text in texts for m in EPOCH.finditer(text)]


@pytest.mark.slow
def test_a_prune_job_killed_twice_resumes_to_the_uninterrupted_plans(tmp_path) -> None:
    def note(line: str) -> None:  # the scenario's figures, as they come (pytest -s shows them)
        print(line, flush=True)

    grid = write_grid(tmp_path / "resumed.yaml", scenario_grid(tmp_path))
    t0 = time.time()
    sweep_out = tmp_path / "sweep"
    sweep_out.mkdir()
    finished(start("sweep", grid, sweep_out, tmp_path / "sweep.log"), tmp_path / "sweep.log")
    note(f"checkpoint + sweep: {time.time() - t0:.0f} s")
    outputs = {}
    for run in ("whole", "killed"):
        outputs[run] = tmp_path / run
        (outputs[run] / "resumed").mkdir(parents=True)
        for name in SWEEP_FILES:
            shutil.copy(sweep_out / "resumed" / name, outputs[run] / "resumed" / name)
    whole, killed = outputs["whole"] / "resumed", outputs["killed"] / "resumed"

    t0 = time.time()
    finished(start("prune", grid, outputs["whole"], tmp_path / "whole.log"), tmp_path / "whole.log")
    note(f"uninterrupted prune job: {time.time() - t0:.0f} s")

    # 1: killed after its first plan.json, before its last
    t0 = time.time()
    logs = [tmp_path / f"killed-{i}.log" for i in (1, 2, 3)]
    proc = start("prune", grid, outputs["killed"], logs[0])
    kill_when(proc, lambda: len(list(killed.glob("plans/*/plan.json"))) >= 1, "first plan.json")
    first = fingerprints(killed)
    assert 1 <= len(first) < 3, first
    note(f"kill 1 after {time.time() - t0:.0f} s with {len(first)} plan.json")

    refused = subprocess.run([sys.executable, "-m", "runner.cli", "prune", "--grid", str(grid), "--output",
                              str(outputs["killed"])], capture_output=True, text=True, env=cli_env(), timeout=300)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode == 2 and len(errors) == 1 and "--resume" in errors[0], refused.stderr

    # 2: resumed, killed again while fine-tuning (every plan made, none verified)
    t0 = time.time()
    proc = start("prune", grid, outputs["killed"], logs[1], "--resume")
    kill_when(proc, lambda: epochs_logged(logs[1].read_text()), "fine-tuning epoch")
    second = fingerprints(killed)
    assert len(second) == 3 and not list(killed.glob("plans/*/verified.json"))
    assert {k: second[k] for k in first} == first  # plan.json written before the kill: never again
    text2 = logs[1].read_text()
    assert text2.count("made by an earlier run") == len(first), text2[-3000:]
    note(f"kill 2 after {time.time() - t0:.0f} s; epochs logged: {epochs_logged(text2)}; fine-tuned: "
                f"{len(list(killed.glob('plans/*/correct_finetuned.npy')))}; checkpoints: "
                f"{sorted(p.parent.name for p in killed.glob('plans/*/finetune.pt'))}")

    # 3: resumed to the end
    t0 = time.time()
    text3 = finished(start("prune", grid, outputs["killed"], logs[2], "--resume"), logs[2])
    note(f"resumed to the end: {time.time() - t0:.0f} s")
    assert fingerprints(killed) == second  # no plan.json rewritten
    assert text3.count("made by an earlier run") == 3
    texts = [logs[0].read_text(), text2, text3]
    done = epochs_logged(*texts)
    assert len(done) == len(set(done)), done  # no epoch finished twice (each finished epoch logs one line)
    assert "continued after epoch" in text3, text3[-3000:]
    note(f"epochs logged over the three runs: {sorted(done)}")
    ours, theirs = pd.read_csv(killed / "plans.csv"), pd.read_csv(whole / "plans.csv")
    pd.testing.assert_frame_equal(comparable(ours), comparable(theirs), check_exact=True)
    note("plans.csv equal to the uninterrupted job's on: " + ", ".join(comparable(ours).columns))
    note(f"accuracy_finetuned: {dict(zip(ours['method'], ours['accuracy_finetuned']))}")
    ids = {}
    for run_dir in sorted((killed / "wandb").glob("offline-run-*")):
        ids.setdefault(run_dir.name.rsplit("-", 1)[1], []).append(run_dir.name)
    note(f"W&B offline run folders: {sum(map(len, ids.values()))}, ids: {len(ids)}")
    assert len(ids) == 3  # one run per plan: a resumed trial continues its plan's run (the same id)

    # a budget added: only its plans are made
    t0 = time.time()
    text4 = finished(start("prune", grid, outputs["killed"], tmp_path / "added.log", "--resume", "--set",
                           "plan.budgets=[{macs: 0.6}, {macs: 0.8}]"), tmp_path / "added.log")
    note(f"budget macs 0.8 added: {time.time() - t0:.0f} s")
    now = fingerprints(killed)
    assert {k: now[k] for k in second} == second and len(now) == 6
    assert text4.count("made by an earlier run") == 3 and "fine-tuning 3 pruned models" in text4
    table = pd.read_csv(killed / "plans.csv")
    assert len(table) == 6 and sorted(set(table["budget"])) == ["macs0.6", "macs0.8"]

    # the sweep's report, written again, keeps the plans section
    finished(start("sweep", grid, outputs["killed"], tmp_path / "sweep-resume.log", "--resume"),
             tmp_path / "sweep-resume.log")
    report = (killed / "report.md").read_text()
    assert report.count("## Plans: a smaller model under a budget") == 1 and "## Which layers" in report
    assert "macs0.8" in report
