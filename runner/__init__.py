"""prune-sweep's runner: everything above the networks, in layers whose imports go one way only.

    runner.cli                 the command (argument parsing, logging, exit codes)
    runner.api                 the same job for notebooks: sweep(grid) and load_results(folder), as DataFrames
    runner.job                 the Ray Tune job: Ray's start, trials, the driver's collector, the sweep's story
    runner.inputs              the grid resolved: data, checkpoints, training, the trials to run
    runner.engine              tensors in, numbers out: criteria, masks, the cached layer sweep, evaluation
    runner.outputs             results.csv, report, figures, W&B tracking (no torch)
    runner.basics, .config, .errors, .storage, .provenance   basics every layer may use

A layer imports only the layers listed below it (and `model`, which imports nothing from here);
tests/test_imports.py checks it. May import: `runner.api`, and only when `sweep` or `load_results` is first
used (so that `import runner` stays cheap: no torch, Ray or pandas).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_results", "sweep"]


def __getattr__(name: str) -> Any:
    """`from runner import sweep, load_results`, imported on first use."""
    if name in __all__:
        from runner import api

        return getattr(api, name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
