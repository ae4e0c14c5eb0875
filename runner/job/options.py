"""What a command or a notebook asks of a job: the grid and the command's flags, as one frozen record."""

from __future__ import annotations

from dataclasses import dataclass

from runner.config import Grid


@dataclass(frozen=True)
class Options:
    grid: str | Grid  # a grid file, or a Grid already loaded (the Python API)
    output: str | None = None
    resume: bool = False
    wandb_mode: str | None = None
    address: str | None = None
    dry_run: bool = False
    overrides: tuple[str, ...] = ()
