"""Experiment tracking as the jobs see it: the Tracker they hold and call, the runs it writes (`Tracking`,
`RunSpec`), and a tracker that does nothing.

No other module asks whether W&B is on: the sweep holds a Tracker and calls it. The Weights & Biases tracker,
and `make_tracker`, which picks it or `NullTracker`, are in `runner.outputs.wandb_tracker`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from runner.basics import NullTrainLog, TrainLog, short

Picture = np.ndarray | Path  # a feature-map image: uint8 RGB pixels, or a PNG file of them
SUMMARY_RUN, TRAIN_RUN = "summary", "train"


@dataclass(frozen=True)
class Tracking:
    """Where a sweep's runs go; plain and picklable (the collector builds its own tracker from it)."""

    mode: str  # auto | online | offline | disabled (make_tracker resolves auto)
    project: str
    entity: str | None
    group: str  # the sweep's name
    folder: Path  # the sweep's output folder: offline runs go to <folder>/wandb
    config: dict[str, Any] = field(default_factory=dict)  # every run's config (the resolved grid)
    feature_maps: bool = True
    sweep_id: str | None = None  # run ids <sweep_id>-<run>: stable across --resume; None: new ids


@dataclass(frozen=True)
class RunSpec:
    """One run: its name, job type, own config (added to the sweep's), tags and the artifact it uses."""

    name: str
    job_type: str
    config: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    uses: str | None = None  # "name:alias" of the model artifact it reads (recorded online only)


class Tracker(Protocol):
    mode: str

    def train_log(self, run: RunSpec) -> TrainLog: ...

    def log_point(self, run: RunSpec, row: dict[str, Any], images: Callable[[], dict[str, Picture]]) -> None: ...

    def finish_trial(self, name: str, rows: Sequence[dict[str, Any]], failed: bool = False) -> None: ...

    def summary(self, run: RunSpec, rows: Sequence[dict[str, Any]], baseline: float, figures: dict[str, Path],
                failed: Sequence[str], files: Sequence[Path], extra: dict[str, Any] | None = None) -> None: ...

    def record(self, run: RunSpec, values: dict[str, Any], figures: dict[str, Path],
               rows: Sequence[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...

    def log_table(self, run: RunSpec, name: str, rows: Sequence[dict[str, Any]], images: dict[str, Path]) -> None:
        """One run holding a table (`rows`) and images (a latency table and its heatmap)."""


class NullTracker:
    """W&B disabled: every call does nothing."""

    mode = "disabled"

    def train_log(self, run: RunSpec) -> TrainLog:
        return NullTrainLog()

    def log_point(self, run: RunSpec, row: dict[str, Any], images: Callable[[], dict[str, Picture]]) -> None:
        pass

    def finish_trial(self, name: str, rows: Sequence[dict[str, Any]], failed: bool = False) -> None:
        pass

    def summary(self, run: RunSpec, rows: Sequence[dict[str, Any]], baseline: float, figures: dict[str, Path],
                failed: Sequence[str], files: Sequence[Path], extra: dict[str, Any] | None = None) -> None:
        pass

    def record(self, run: RunSpec, values: dict[str, Any], figures: dict[str, Path],
               rows: Sequence[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass

    def log_table(self, run: RunSpec, name: str, rows: Sequence[dict[str, Any]], images: dict[str, Path]) -> None:
        pass


def model_artifact(checkpoint: str | Path, sha256: str) -> str:
    """The checkpoint's `model` artifact, as name:alias ("checkpoint-demo:sha256-0123456789ab")."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", Path(checkpoint).stem)
    return f"checkpoint-{stem}:sha256-{short(sha256)}"
