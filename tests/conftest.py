"""Shared fixtures: tiny CPU models and data (width 0.125, a few hundred images), the real CIFAR-10 copy when
../shared is beside the checkout (a visible skip otherwise)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from runner.config import Grid, parse_grid
from runner.device import tune_allocator

tune_allocator()
torch.set_num_threads(min(2, os.cpu_count() or 1))

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
