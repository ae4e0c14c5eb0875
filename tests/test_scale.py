"""Scale on one machine: every conv of a width-0.125 ResNet-18, shortcuts included (20), K at 64
fractions of each layer's channels (as many distinct K as a layer has channels, up to 64), 3 criteria, 500
eval images, W&B offline: 60 trials, 1,800 points. It completes, memory stays bounded, and the results, plots
and report stay readable at that size. Marked slow (a few minutes); the measured time and peak memory are
printed (run with -s to see them).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml
from e2e_helpers import descendants, finish, grid_dict, keys, measured, results, rss_bytes, start_cli, stop_group
from PIL import Image

from runner.config import parse_grid
from runner.inputs.train import train_checkpoint

pytestmark = pytest.mark.slow

CHANNELS = {8: 5, 16: 5, 32: 5, 64: 5}  # width 0.125: output channels -> convs of that width (20 in all)
CRITERIA = ["l1_norm", "mean_activation", "random"]
POINTS = sum(c * n for c, n in CHANNELS.items()) * len(CRITERIA)  # every K from 1 to the channel count
GIB = 2**30


def scale_grid(tmp: Path) -> dict:
    return grid_dict(tmp, name="scale", data={"synthetic_train": 4000, "synthetic_test": 500, "calibration_size": 500,
                                              "eval_size": 500},
                     checkpoint={"path": str(tmp / "w0125.pt"), "train": {"epochs": 4, "batch_size": 100, "lr": 0.1}},
                     sweep={"layers": "all", "include_shortcuts": True, "batch_size": 500,
                            "k": {"fractions": [i / 64 for i in range(1, 65)]}, "criteria": CRITERIA, "random_repeats": 1},
                     wandb={"mode": "offline"})


class PeakMemory:
    """Samples the resident memory of the driver and of everything it started (Ray, workers) twice a second."""

    def __init__(self, pid: int) -> None:
        self.pid, self.driver, self.total, self._stop = pid, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            driver = rss_bytes(self.pid)
            self.driver = max(self.driver, driver)
            self.total = max(self.total, driver + sum(rss_bytes(p) for p in descendants(self.pid)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_twenty_convs_by_64_k_by_3_criteria(tmp_path):
    raw = scale_grid(tmp_path)
    trained = time.time()
    train_checkpoint(parse_grid(raw, "scale"), progress=False)
    trained = time.time() - trained
    path = tmp_path / "scale.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")

    started = time.time()
    proc = start_cli(["--grid", str(path)], cwd=tmp_path)
    memory = PeakMemory(proc.pid)
    try:
        run = finish(proc, started, 1500)
    finally:
        memory.stop()
        stop_group(proc)
    assert run.returncode == 0, run.explain()
    folder = tmp_path / "runs" / "scale"
    rows = results(folder)
    assert len(rows) == len(set(keys(rows))) == POINTS == 1800
    assert measured(run) == (POINTS, POINTS, POINTS)
    print(f"\nscale: {POINTS} points in 60 trials, {run.seconds:.0f} s for the sweep (checkpoint trained in "
          f"{trained:.0f} s); peak RSS {memory.driver / GIB:.2f} GiB driver, {memory.total / GIB:.2f} GiB driver "
          "+ Ray + workers")
    # bounded: the driver holds a table of rows, not the points' feature maps or Tune's result history
    assert memory.driver < 2.5 * GIB and memory.total < 8 * GIB, (memory.driver, memory.total)

    # readable at this size: a row of panels per stage (legends of at most 5 layers, not 20), and a heatmap whose
    # width does not grow with the number of K values
    for name in ("accuracy_vs_k", "sensitivity"):
        with Image.open(folder / "plots" / f"{name}.png") as image:
            width, height = image.size
        assert width <= 2000 and height <= 1400, (name, image.size)
    report = (folder / "report.md").read_text(encoding="utf-8")
    assert len(report.splitlines()) < 130  # a summary to read, not a dump of 1,800 rows
    sensitivity = report.split("## Which layers")[1].split("## Criteria compared")[0]
    table = [line for line in sensitivity.splitlines() if line.startswith("| `")]
    assert len(table) == 20 and "more layers" not in report  # every layer once, every criterion side by side
    assert all(line.count(" / ") == len(CRITERIA) for line in table)
    # every trial kept a few feature-map figures, not 1,800 of them
    assert len(list((folder / "feature_maps").rglob("*.png"))) == 60 * 3 * 2
