"""The grid's model section built (model.zoo), its problems as one-line input errors."""

from __future__ import annotations

from torch import nn

from model.zoo import ModelError, Spec, build as build_spec
from runner.config import Grid, ModelConfig
from runner.errors import InputError


def spec_of(model: ModelConfig) -> Spec:
    return Spec(model.arch, float(model.width), model.num_classes, dict(model.kwargs), model.weights,
                model.python_path)


def build(spec: Spec, pretrained: bool = True) -> nn.Module:
    """`model.zoo.build`, its problems as one-line input errors."""
    try:
        return build_spec(spec, pretrained)
    except ModelError as e:
        raise InputError(f"model.{e.field}", e.value, e.problem, e.allowed, e.fix) from None


def build_for(grid: Grid, pretrained: bool = True) -> nn.Module:
    return build(spec_of(grid.model), pretrained)
