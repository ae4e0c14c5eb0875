"""The train job: the checkpoint a grid names, trained with its recipe; with W&B on, as a `train` run that logs
the checkpoint as a `model` artifact (offline runs go to the sweep's folder, <output>/<name>/wandb)."""

from __future__ import annotations

from contextlib import closing

from runner.config import Grid, load_grid
from runner.inputs.train import train_checkpoint
from runner.job.options import Options
from runner.outputs.tracking import TRAIN_RUN, RunSpec, Tracking
from runner.outputs.wandb_tracker import make_tracker


def run_train(opts: Options) -> str:
    """Train the grid's checkpoint (a grid file, or a Grid already loaded); returns its path."""
    grid = opts.grid if isinstance(opts.grid, Grid) else load_grid(opts.grid, list(opts.overrides))
    tracking = Tracking(grid.wandb.mode, grid.wandb.project, grid.wandb.entity, grid.name, grid.folder,
                        grid.as_dict(), grid.wandb.feature_maps)
    with closing(make_tracker(tracking)) as tracker:
        return train_checkpoint(grid, log_to=tracker.train_log(RunSpec(TRAIN_RUN, "train")))
