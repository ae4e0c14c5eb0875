"""The synthetic data is a real learning problem: a linear classifier on raw pixels does clearly worse than
the demo's small ResNet, which reaches >= 90%, and pruning hurts that ResNet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from runner.config import load_grid
from runner.inputs.data import load_data
from runner.inputs.synthetic import generate
from runner.inputs.train import normalisation, recipe_of, train_model
from runner.inputs.train import (
    test_accuracy as accuracy_on_test,  # (a name pytest would collect)
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_linear_classifier_on_raw_pixels_stays_far_below_the_cnn() -> None:
    x, y = generate(6000, seed=11)
    x = torch.tensor(x, dtype=torch.float32).flatten(1) / 255
    y = torch.tensor(y)
    x = x - x[:5000].mean(0)
    w = torch.zeros(x.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        for idx in torch.randperm(5000, generator=gen).split(250):
            loss = F.cross_entropy(x[idx] @ w + b, y[idx]) + 1e-4 * w.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    accuracy = 100 * float(((x[5000:] @ w + b).argmax(1) == y[5000:]).float().mean())
    assert 10 < accuracy < 50  # better than chance (colour is a weak cue), far below the CNN's >= 90


@pytest.mark.slow
def test_the_demo_recipe_reaches_90_percent_and_pruning_hurts() -> None:
    grid = load_grid(ROOT / "sweeps" / "demo.yaml")
    data = load_data(grid.data, grid.model.num_classes, grid.seed)
    recipe = recipe_of(grid.checkpoint.train)
    model, losses = train_model(grid, data, recipe, torch.device("cpu"), progress=False)
    norm = normalisation(recipe, data)
    accuracy = accuracy_on_test(model, data, torch.device("cpu"), *norm)
    assert accuracy >= 90
    with torch.no_grad():
        model.layer2[0].bn1.weight[:16] = 0  # half of one layer's channels removed
        model.layer2[0].bn1.bias[:16] = 0
    assert accuracy_on_test(model, data, torch.device("cpu"), *norm) < accuracy - 5
