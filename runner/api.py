"""The Python API, for notebooks: `sweep(grid)` runs the same job as `prune-sweep sweep` and returns its results;
`load_results(folder)` reads a finished or partial output folder. Both return pandas DataFrames.

    from runner import sweep, load_results
    df = sweep("sweeps/demo.yaml")            # or a dict in the grid file's layout, or a runner.config.Grid
    df = load_results("runs/demo")            # what is on disk, even while the sweep still runs

    from runner.api import prune
    plans = prune("sweeps/plan.yaml")         # the same job as `prune-sweep prune`: plans.csv as a DataFrame

Importing this module is cheap: the job (torch, Ray) is imported when `sweep` is called, pandas when a table is
made.

May import: `runner.job`, `runner.outputs`, `runner.config`, `runner.errors`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import pandas

    from runner.config import Grid

log = logging.getLogger(__name__)


def sweep(grid: "str | Path | Mapping[str, Any] | Grid", *, output: str | None = None, resume: bool = False,
          wandb_mode: str | None = None, address: str | None = None, overrides: "str | Sequence[str]" = ()
          ) -> "pandas.DataFrame":
    """Run a sweep (the same job as the command: outputs on disk, W&B runs, Ray Tune trials) and return its
    results.csv as a DataFrame (see `load_results`). `grid` is a grid file, a dict in the grid file's layout
    (relative paths are relative to the current directory) or a Grid. Bad input raises
    runner.errors.InputError with the command's one-line message; trials that failed after their retries are
    listed in the frame's `attrs["failed"]` (and logged), and their points are missing."""
    from runner.config import apply_override, parse_grid
    from runner.job.options import Options
    from runner.job.sweep import run_sweep

    overrides = _items(overrides)

    if isinstance(grid, (str, Path)):
        source: Any = str(grid)
        sets = tuple(overrides)  # applied (and blamed) like --set
    else:
        source, sets = grid, ()
        if isinstance(grid, Mapping) or overrides:
            raw = dict(grid) if isinstance(grid, Mapping) else grid.as_dict()
            for item in overrides:
                raw = apply_override(raw, item)
            source = parse_grid(raw, "sweep(dict)" if isinstance(grid, Mapping) else "sweep(grid)").resolved(Path.cwd())
    from runner.outputs.results import frame_of

    outcome = run_sweep(Options(source, output, resume, wandb_mode, address, False, sets))
    frame = frame_of(outcome.folder / "results.csv")  # a sweep whose every trial failed: an empty frame
    frame.attrs.update(folder=str(outcome.folder), failed=list(outcome.failed), expected_points=outcome.expected,
                       measured=outcome.measured)
    if outcome.failed:
        log.warning("%d trials failed after their retries: %s", len(outcome.failed), ", ".join(outcome.failed))
    return frame


def load_results(folder: str | Path, tune: bool = False) -> "pandas.DataFrame":
    """The results of a finished or partial sweep (its results.csv: one row per point, numbers as numbers,
    `per_class_accuracy` as a list of floats in percent). With tune=True, Tune's own per-trial table instead:
    status, retries, error file and last reported point of every trial (Tune keeps only each trial's last
    result; every point is in results.csv)."""
    import pandas as pd

    from runner.errors import InputError
    from runner.outputs.results import frame_of

    folder = Path(folder)
    allowed = "the output folder of a sweep (<output>/<name>/, holding results.csv)"
    if not folder.is_dir():
        raise InputError("load_results(folder)", str(folder.resolve()), "no such folder", allowed,
                         "check the path, which is relative to the working directory " + str(Path.cwd()))
    if tune:
        rows = _tune_rows(folder)
        if not rows:
            raise InputError("load_results(folder, tune=True)", str(folder.resolve()), "no Tune experiment there",
                             allowed, "run or resume the sweep in that folder first")
        frame = pd.DataFrame(rows)
        frame["ended"] = pd.to_datetime(frame["ended"], unit="s", utc=True)  # Tune's timestamp: epoch seconds
        return frame
    if not (folder / "results.csv").is_file():
        raise InputError("load_results(folder)", str(folder.resolve()), "no results.csv in that folder", allowed,
                         "give the folder the sweep wrote (it logs `wrote .../results.csv`), or run the sweep first")
    return frame_of(folder / "results.csv")


def _items(overrides: "str | Sequence[str]") -> tuple[str, ...]:
    """The overrides as a tuple of KEY=VALUE strings: one string is one override, not a sequence of letters."""
    return (overrides,) if isinstance(overrides, str) else tuple(overrides)


def _tune_rows(folder: Path) -> list[dict[str, Any]]:
    import yaml

    from runner.job.tuner import tune_table  # imports Ray (not started)

    saved = folder / "config.yaml"
    doc = yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
    storage = ((doc or {}).get("resources") or {}).get("tune_storage")
    if storage:  # Tune's state kept elsewhere (a shared folder or a cloud URI): the experiment config.yaml names
        return tune_table(folder, f"{storage.rstrip('/')}/{doc['name']}", [doc["tune_experiment"]])
    return tune_table(folder)


def prune(grid: "str | Path", *, output: str | None = None, resume: bool = False, wandb_mode: str | None = None,
          address: str | None = None, overrides: "str | Sequence[str]" = ()) -> "pandas.DataFrame":
    """Plan, prune, fine-tune and verify (the same job as `prune-sweep prune`, the sweep's missing points
    measured first) and return plans.csv as a DataFrame; plans that failed are in `attrs["failed"]`. `resume`
    continues a job in the same folder (as `--resume`). Bad input raises runner.errors.InputError with the
    command's one-line message."""
    import pandas as pd

    from runner.job.prune import run_prune
    from runner.job.options import Options
    from runner.outputs.plans import CSV

    outcome = run_prune(Options(str(grid), output, resume, wandb_mode, address, False, _items(overrides)))
    path = outcome.folder / CSV
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    frame.attrs.update(folder=str(outcome.folder), failed=list(outcome.failed), seconds=outcome.seconds)
    if outcome.failed:
        log.warning("%d plans failed: %s", len(outcome.failed), ", ".join(outcome.failed))
    return frame
