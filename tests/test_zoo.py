"""Model sources (model.zoo): ours, torchvision, timm, the user's factory; each problem one line."""

from __future__ import annotations

import textwrap

import pytest
from torch import nn

from model.resnet import ResNet18
from model.zoo import Spec
from runner.config import load_grid, parse_grid
from runner.errors import InputError
from runner.inputs.models import build, spec_of


def error(spec: Spec) -> str:
    with pytest.raises(InputError) as e:
        build(spec)
    return str(e.value)


def test_ours_is_the_default_and_unchanged():
    grid = parse_grid({"model": {"width": 0.125}}, "g.yaml")
    model = build(spec_of(grid.model))
    assert type(model) is ResNet18 and model.width == 0.125 and model.linear.out_features == 10


def test_torchvision_builder_with_kwargs_and_classes():
    model = build(Spec("torchvision:mobilenet_v2", num_classes=7, kwargs={"width_mult": 0.25}))
    assert model.classifier[-1].out_features == 7
    assert model.features[0][0].out_channels == 8  # 32 * 0.25


def test_torchvision_unknown_builder_and_weights_are_one_line():
    assert error(Spec("torchvision:resnet_19")).startswith("model.arch: no such torchvision builder: got "
                                                           "'torchvision:resnet_19'")
    line = error(Spec("torchvision:resnet18", num_classes=1000, weights="NOPE"))
    assert line.startswith("model.weights: no such weights for resnet18: got 'NOPE'; allowed: IMAGENET1K_V1")
    assert "\n" not in line


def test_torchvision_kwargs_refused_are_one_line():
    line = error(Spec("torchvision:resnet18", kwargs={"depth": 3}))
    assert line.startswith("model.kwargs: resnet18 refused them") and "\n" not in line


def test_timm_missing_says_how_to_install():
    try:
        import timm  # noqa: F401  only whether it imports matters
        pytest.skip("timm is installed")
    except ImportError:
        pass
    assert error(Spec("timm:resnet18")).endswith('fix: pip install -e ".[timm]"')


def test_python_factory_from_the_grid_folder(tmp_path):
    (tmp_path / "nets.py").write_text(textwrap.dedent("""
        from torch import nn
        def tiny(classes=10, width=4):
            return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))
        NOT_A_FACTORY = 3
    """))
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text("model: {arch: 'python:nets:tiny', kwargs: {classes: 5, width: 6}, num_classes: 5}\n")
    grid = load_grid(grid_file, base=tmp_path)
    assert grid.model.python_path == str(tmp_path.resolve())
    model = build(spec_of(grid.model))
    assert isinstance(model, nn.Sequential) and model[0].out_channels == 6
    path = str(tmp_path)
    assert error(Spec("python:nets:NOT_A_FACTORY", python_path=path)).startswith(
        "model.arch: nets has no callable NOT_A_FACTORY")
    assert error(Spec("python:nets:tiny", kwargs={"depth": 2}, python_path=path)).startswith(
        "model.kwargs: tiny refused them")
    assert error(Spec("python:no_such_module_here:f")).startswith("model.arch: cannot import no_such_module_here")


def test_python_source_only_from_the_grid_file(tmp_path):
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text("name: x\n")
    with pytest.raises(InputError) as e:
        load_grid(grid_file, ["model.arch=python:os:getcwd"], base=tmp_path)
    assert e.value.field == "--set" and "only in the grid file" in str(e.value)


@pytest.mark.parametrize("arch", ["resnet50", "torchvision", "torchvision:", "timm", "ours:x"])
def test_bad_source_form(arch):
    with pytest.raises(InputError) as e:
        parse_grid({"model": {"arch": arch}}, "g.yaml")
    assert str(e.value).startswith(f"g.yaml: model.arch: not a known model source: got '{arch}'; allowed: resnet18, "
                                   "torchvision:<builder>, timm:<name>, python:<module>:<callable>")


def test_untraceable_factory_is_one_line_at_the_plan(tmp_path):
    from runner.inputs.trials import plan_trials

    (tmp_path / "gated.py").write_text(textwrap.dedent("""
        from torch import nn
        class Gate(nn.Module):
            def forward(self, x):
                return x if x.sum() > 0 else -x
        def net():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Gate(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, 10))
    """))
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text("model: {arch: 'python:gated:net'}\n")
    with pytest.raises(InputError) as e:
        plan_trials(load_grid(grid_file, base=tmp_path))
    line = str(e.value)
    assert line.startswith("model.arch: cannot trace") and "'2' (Gate)" in line and "\n" not in line
