"""Shared fixtures: tiny CPU models and data (width 0.125, a few hundred images), the real CIFAR-10 copy when
../shared is beside the checkout (a visible skip otherwise)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from runner.config import Grid, parse_grid
from runner.engine.device import tune_allocator

tune_allocator()
# One thread: on cores shared with other processes, OpenMP's waiting threads spin against them (the one-pass
# rankings test took 46 s with 2 threads on a loaded 2-core machine, 1.2 s with 1).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


def tiny_grid_dict(tmp: Path) -> dict:
    """A grid small enough for a unit test: width 0.125, 600 train / 200 test synthetic images."""
    return {
        "name": "tiny",
        "seed": 0,
        "model": {"width": 0.125},
        "data": {"dataset": "synthetic", "synthetic_train": 600, "synthetic_test": 200, "calibration_size": 100},
        "checkpoint": {"path": str(tmp / "tiny.pt"), "train": {"epochs": 1, "batch_size": 100}},
        "sweep": {"k": {"fractions": [0.25, 0.5, 1.0]}, "criteria": ["mean_activation", "l1_norm"],
                  "batch_size": 50},
        "output": str(tmp / "runs"),
    }


@pytest.fixture
def tiny_grid(tmp_path: Path) -> Grid:
    return parse_grid(tiny_grid_dict(tmp_path), "tiny")


def scramble_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN non-trivial statistics and affine terms, so that pruning any channel changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not (SHARED_CIFAR / "cifar10-test.npz").is_file():
        pytest.skip(f"real CIFAR-10 arrays not found at {SHARED_CIFAR} (only on the team's machines)")
    return SHARED_CIFAR


# ---- End-to-end sweeps (tests/test_sweep.py, tests/test_cli.py) ----
# Ray reads some of these when it is imported (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER: sockets on 127.0.0.1 only),
# so they are set here, before anything imports ray; CLI subprocesses inherit them.
from runner.job.ray_env import ray_env  # noqa: E402  (imports no Ray)

for _key, _value in ray_env(None).items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("WANDB_SILENT", "true")

import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every in-process sweep (runner.job.cluster.start_ray reuses it and leaves it running)."""
    import logging

    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def sweep_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint every end-to-end sweep shares: trained once (width 0.125, 1 epoch on tiny synthetic data)."""
    from runner.inputs.train import train_checkpoint

    folder = tmp_path_factory.mktemp("checkpoint")
    grid = parse_grid(tiny_grid_dict(folder), "tiny")
    return Path(train_checkpoint(grid, progress=False))


@pytest.fixture(scope="session")
def small_sweep(ray_session, sweep_checkpoint, tmp_path_factory) -> SimpleNamespace:
    """The small sweep (3 layers x 2 K x 2 criteria, W&B offline) run once, in process, on the shared Ray."""
    from e2e_helpers import SMALL_CRITERIA, SMALL_FRACTIONS, SMALL_LAYERS, grid_dict, write_grid

    from runner.job.sweep import Options, run_sweep

    tmp = tmp_path_factory.mktemp("small_sweep")
    grid = grid_dict(tmp, sweep_checkpoint, name="small", layers=list(SMALL_LAYERS),
                     k={"fractions": list(SMALL_FRACTIONS)}, criteria=list(SMALL_CRITERIA))
    path = write_grid(tmp / "small.yaml", grid)
    started = time.time()
    outcome = run_sweep(Options(str(path)))
    return SimpleNamespace(grid_path=path, grid=grid, outcome=outcome, folder=outcome.folder,
                           seconds=time.time() - started, checkpoint=sweep_checkpoint, tmp=tmp)
