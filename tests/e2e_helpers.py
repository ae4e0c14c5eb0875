"""Helpers for the tests: the one grid builder, the command's result (in this process, see the `cli` fixture of
conftest.py, or in a subprocess) and its refusals, results.csv and W&B offline runs read back (with W&B's own
`wandb leet inspect`), and the processes of a running sweep."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from runner.outputs.results import read_rows

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sweep.py"
GRIDS = ROOT / "tests" / "grids"

# Environment that must not leak from the developer's shell into a sweep under test.
SCRUB = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY",
         "RAY_ADDRESS", "PRUNE_SWEEP_CRASH_ONCE", "PRUNE_SWEEP_CRASH_ONCE_HARD", "PRUNE_SWEEP_DEBUG")

# The small sweep shared by several tests: 3 layers of 8, 16 and 32 output channels (width 0.125),
# K as fractions (so K and fraction differ per layer), 2 criteria: 12 points in 6 trials.
SMALL_LAYERS = {"layer1.0.conv1": 8, "layer2.0.conv2": 16, "layer3.1.conv1": 32}
SMALL_FRACTIONS = (0.25, 0.5)
SMALL_CRITERIA = ("mean_activation", "l1_norm")
SMALL_EVAL = 150


def grid_dict(tmp: Path, *updates: dict, **sections: Any) -> dict:
    """The one grid builder: a tiny grid (width 0.125, 600/200 synthetic images of which 100 held out, a 1-epoch
    recipe, the checkpoint at tmp/tiny.pt, output tmp/runs), then `updates` and `sections` applied in order: a
    mapping updates that section's keys, anything else replaces the section."""
    grid: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "model": {"width": 0.125},
        "data": {"dataset": "synthetic", "synthetic_train": 600, "synthetic_test": 200, "calibration_size": 100},
        "checkpoint": {"path": str(tmp / "tiny.pt"), "train": {"epochs": 1, "batch_size": 100}},
        "sweep": {"k": {"fractions": [0.25, 0.5, 1.0]}, "criteria": ["mean_activation", "l1_norm"],
                  "batch_size": 50, "random_repeats": 1},
        "output": str(tmp / "runs"),
    }
    for update in (*updates, sections):
        for key, value in update.items():
            merge = isinstance(value, dict) and isinstance(grid.get(key), dict)
            grid[key] = {**grid[key], **value} if merge else value
    return grid


def e2e(checkpoint: Path) -> dict:
    """What an end-to-end sweep adds to the tiny grid: the session's shared checkpoint, 150 eval images, batches
    of 100, W&B offline."""
    return {"checkpoint": {"path": str(checkpoint)}, "data": {"eval_size": SMALL_EVAL}, "sweep": {"batch_size": 100},
            "wandb": {"mode": "offline"}}


def write_grid(path: Path, grid: dict) -> Path:
    path.write_text(yaml.safe_dump(grid, sort_keys=False), encoding="utf-8")
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env.update({"WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def err_lines(self) -> list[str]:
        return nonempty_lines(self.stderr)

    @property
    def out_lines(self) -> list[str]:
        return nonempty_lines(self.stdout)

    def explain(self) -> str:
        return f"rc={self.returncode} after {self.seconds:.1f} s\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def refused(run: CliRun) -> str:
    """The one line of a refused command (exit code 2, nothing else on stderr, nothing on stdout)."""
    assert run.returncode == 2, run.explain()
    assert len(run.err_lines) == 1 and run.err_lines[0].startswith("error: "), run.explain()
    assert run.stdout == "", run.explain()
    return run.err_lines[0]


def start_cli(args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python scripts/sweep.py ARGS` in its own process group (so that Ctrl-C can be sent as a terminal
    would, and so that a hung run can be stopped with everything it started)."""
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    """Kill a CLI run we started, and the Ray processes it started (same process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def finish(proc: subprocess.Popen, started: float, timeout: float) -> CliRun:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"the CLI did not finish in {timeout:.0f} s\n--- stdout\n{out}\n--- stderr\n{err}") from None
    return CliRun(proc.returncode, out, err, time.time() - started)


def run_cli(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> CliRun:
    started = time.time()
    return finish(start_cli(args, cwd=cwd, env=env), started, timeout)


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def results(folder: Path) -> list[dict[str, Any]]:
    return read_rows(folder / "results.csv")


def keys(rows: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(r["layer"], r["criterion"], int(r["k"])) for r in rows]


def values(folder: Path) -> dict[tuple[str, str, int], tuple[float, float]]:
    """(layer, criterion, K) -> (accuracy, loss) of a sweep's results.csv: what two runs must agree on."""
    return {(r["layer"], r["criterion"], r["k"]): (r["accuracy"], r["loss"]) for r in results(folder)}


def expected_points(layers: dict[str, int], criteria, ks_of) -> set[tuple[str, str, int]]:
    return {(layer, c, k) for layer, channels in layers.items() for c in criteria for k in ks_of(channels)}


# ---- W&B offline runs, read back with W&B's own CLI ----

def wandb_run_dirs(folder: Path) -> list[Path]:
    return sorted((folder / "wandb").glob("offline-run-*"))


def _wandb(run_dir: Path, *args: str) -> str:
    """`wandb leet inspect ARGS RUN_DIR`, run as that command runs it: W&B's core binary (`wandb-core leet
    inspect ... --run-file RUN_FILE WANDB_DIR`), without a Python start and a W&B import per call."""
    from wandb.util import get_core_path

    (run_file,) = run_dir.glob("run-*.wandb")
    command = [get_core_path(), "leet", "inspect", "--no-observability", *args, "--run-file", str(run_file),
               str(run_dir.parent)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=cli_env())
    assert done.returncode == 0, f"wandb leet inspect {' '.join(args)} {run_dir} failed:\n{done.stderr}"
    return done.stdout


def leet_summary(run_dir: Path) -> dict[str, Any]:
    """`wandb leet inspect --summary --json`: name, config, summary, exit_code, state, ..."""
    return json.loads(_wandb(run_dir, "--summary", "--json"))


def leet_records(run_dir: Path) -> list[dict[str, Any]]:
    """`wandb leet inspect --json`: every record of the run file, one JSON object per line."""
    return [json.loads(line) for line in _wandb(run_dir, "--json").splitlines() if line.strip()]


def run_info(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run record (display_name, run_group, job_type, config, ...), its config with the later updates."""
    runs = [r["run"] for r in records if r.get("type") == "run"]
    assert runs, "no run record"
    info = runs[0]
    for r in records:
        if r.get("type") == "config":
            info["config"]["update"].update(r["config"].get("update", {}))
    return info


def history(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def artifacts(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The artifacts of one type a run logged (each with its manifest, as the offline run file holds it)."""
    return [r["artifact"] for r in records if r.get("type") == "artifact" and r["artifact"]["type"] == kind]


def manifest_paths(artifact: dict[str, Any]) -> list[str]:
    return sorted(entry["path"] for entry in artifact["manifest"]["contents"])


def runs_by_name(folder: Path) -> dict[str, list[tuple[Path, dict[str, Any], list[dict[str, Any]]]]]:
    """Every offline run folder of a sweep, grouped by run name: (folder, run record, records), oldest first. A
    resumed run (the same id) is a second folder: W&B writes one per process, and `wandb sync` joins them."""
    out: dict[str, list] = {}
    for run_dir in wandb_run_dirs(folder):
        records = leet_records(run_dir)
        info = run_info(records)
        out.setdefault(info["display_name"], []).append((run_dir, info, records))
    return out


# ---- processes of a running sweep (for real faults: SIGKILL a trial's worker, measure memory) ----

def descendants(pid: int) -> list[int]:
    """Every process started (directly or not) by `pid`: Ray's GCS and raylet, and its workers."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def title(pid: int) -> str:
    """A process's command line as `ps` shows it (Ray workers set theirs to `ray::Class.method`)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def trial_workers(driver: int) -> list[int]:
    """The sweep's Ray workers that are running a trial right now."""
    return [p for p in descendants(driver) if title(p).startswith("ray::ImplicitFunc.train")]


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_for_rows(proc: subprocess.Popen, folder: Path, count: int, started: float, limit: float = 300) -> None:
    """Until results.csv holds `count` rows (the sweep still running)."""
    while len(results(folder)) < count:
        assert proc.poll() is None, finish(proc, started, 10).explain()
        assert time.time() - started < limit, f"fewer than {count} results after {limit:.0f} s"
        time.sleep(0.05)


def measured(run: CliRun) -> tuple[int, int, int]:
    """(points in results.csv, points expected, points measured in this run) from the CLI's last line."""
    import re

    found = re.search(r"^(\d+)/(\d+) points \((\d+) measured in this run\)", run.stdout, re.M)
    assert found, run.explain()
    return int(found[1]), int(found[2]), int(found[3])


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small RAM file system at `path` (a disk that fills up, or a read-only one); skips, visibly, where
    mounting is not allowed (not root, or a container without the capability)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


# ---- the paired interval, computed by hand from a row's counts (independent of runner.engine.paired) ----

def paired_interval_by_hand(n: int, right: int, lost: int, gained: int) -> tuple[float, float]:
    """Newcombe's hybrid score interval (1998, method 10) for baseline accuracy minus accuracy at K, in points,
    from: n images, `right` of them right at baseline, `lost` right at baseline and wrong at K, `gained` the
    reverse. Written out from the paper's formulas in counts, as one would on paper."""
    z = 1.959963984540054  # the 97.5% point of the normal distribution
    a, b, c = right - lost, lost, gained  # both right, right then wrong, wrong then right
    d = n - a - b - c  # wrong at both
    x1, x2 = a + b, a + c  # right at baseline, right at K

    def wilson(x: int) -> tuple[float, float]:
        mid = (2 * x + z * z) / (2 * (n + z * z))
        half = z * (x * (n - x) / n + z * z / 4) ** 0.5 / (n + z * z)
        return mid - half, mid + half

    (l1, u1), (l2, u2) = wilson(x1), wilson(x2)
    p1, p2 = x1 / n, x2 / n
    ad_bc = a * d - b * c
    product = x1 * (n - x1) * x2 * (n - x2)
    if product == 0 or 0 <= ad_bc <= n / 2:
        phi = 0.0
    else:
        phi = (ad_bc - n / 2 if ad_bc > 0 else ad_bc) / product ** 0.5
    low = (p1 - p2) - ((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2) ** 0.5
    high = (p1 - p2) + ((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2) ** 0.5
    return 100 * low, 100 * high
