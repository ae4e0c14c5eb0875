"""Where a network comes from: a registry of model sources, one builder each (docs/grid.md#model-sources-modelarch).

    resnet18                      ours (model.resnet), with `width`
    torchvision:<builder>         torchvision.models.get_model(builder, num_classes=..., weights=..., **kwargs)
    timm:<name>                   timm.create_model(name, num_classes=..., pretrained=..., **kwargs) (extra: timm)
    python:<module>:<callable>    the user's factory, called with kwargs: this runs the user's code

Problems raise `ModelError` (what is wrong, what is allowed, the fix); the runner words it as its one-line
input error naming `model.arch` (or `model.weights`).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from model.resnet import ResNet18


@dataclass(frozen=True)
class Spec:
    """What to build: the grid's model section, without the runner's types."""

    arch: str = "resnet18"
    width: float = 1.0  # ours only
    num_classes: int = 10
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None  # torchvision weights name (timm: any non-null value = pretrained)
    python_path: str | None = None  # python: a folder put first on sys.path before the import

    @property
    def source(self) -> str:
        return self.arch.split(":", 1)[0]


class ModelError(ValueError):
    """A model spec that cannot be built: which field, what is wrong, what is allowed, the fix."""

    def __init__(self, field: str, value: Any, problem: str, allowed: str, fix: str) -> None:
        self.field, self.value, self.problem, self.allowed, self.fix = field, value, problem, allowed, fix
        super().__init__(f"model.{field}: {problem}")


def _ours(spec: Spec, name: str, pretrained: bool) -> nn.Module:
    if spec.kwargs or spec.weights:
        raise ModelError("kwargs" if spec.kwargs else "weights", dict(spec.kwargs) or spec.weights,
                         "not used by arch resnet18", "width and num_classes", "remove it")
    return ResNet18(width=spec.width, num_classes=spec.num_classes)


def _torchvision(spec: Spec, name: str, pretrained: bool) -> nn.Module:
    from torchvision import models

    known = models.list_models()
    if name not in known:
        raise ModelError("arch", spec.arch, "no such torchvision builder", "torchvision:<one of "
                         f"{len(known)} builders, e.g. resnet18, resnet50, mobilenet_v2>",
                         "see torchvision.models.list_models()")
    weights = None
    if spec.weights:
        try:
            weights = models.get_model_weights(name)[spec.weights]
        except (KeyError, ValueError):
            try:
                weights = models.get_weight(spec.weights)
            except (KeyError, ValueError, AttributeError):
                options = ", ".join(w.name for w in models.get_model_weights(name))
                raise ModelError("weights", spec.weights, f"no such weights for {name}", options or "none",
                                 "use one of those names, or null for random initialisation") from None
    try:
        return models.get_model(name, weights=weights if pretrained else None, num_classes=spec.num_classes,
                                **dict(spec.kwargs))
    except (TypeError, ValueError) as e:
        raise ModelError("kwargs", dict(spec.kwargs), f"{name} refused them ({_first_line(e)})",
                         f"{name}'s keyword arguments (and num_classes matching the weights)",
                         "fix model.kwargs or model.num_classes") from None
    except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError
        raise ModelError("weights", spec.weights, f"weights unavailable ({_first_line(e)})",
                         "weights already in torch's cache (~/.cache/torch/hub) or a network",
                         "download them once on a connected machine, or use a checkpoint file") from None


def _timm(spec: Spec, name: str, pretrained: bool) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ModelError("arch", spec.arch, "timm is not installed", "resnet18, torchvision:<builder>, "
                         "python:<module>:<callable>", 'pip install -e ".[timm]"') from None
    if name not in timm.list_models():
        raise ModelError("arch", spec.arch, "no such timm model", "a name from timm.list_models()",
                         "check the name")
    try:
        return timm.create_model(name, pretrained=pretrained and bool(spec.weights),
                                 num_classes=spec.num_classes, **dict(spec.kwargs))
    except (TypeError, ValueError) as e:
        raise ModelError("kwargs", dict(spec.kwargs), f"{name} refused them ({_first_line(e)})",
                         f"{name}'s keyword arguments", "fix model.kwargs") from None
    except (OSError, RuntimeError) as e:
        raise ModelError("weights", spec.weights, f"weights unavailable ({_first_line(e)})",
                         "weights in timm's cache or a network", "download them once, or use null") from None


def _python(spec: Spec, name: str, pretrained: bool) -> nn.Module:
    module_name, _, attr = name.partition(":")
    allowed = "python:<module>:<callable>, the module importable from the grid's folder or PYTHONPATH"
    if not module_name or not attr:
        raise ModelError("arch", spec.arch, "not python:<module>:<callable>", allowed, "write e.g. python:nets:build")
    if spec.python_path and spec.python_path not in sys.path:
        sys.path.insert(0, spec.python_path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError("arch", spec.arch, f"cannot import {module_name} ({_first_line(e)})", allowed,
                         "put the module next to the grid file or on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError("arch", spec.arch, f"{module_name} has no callable {attr}", allowed, "check the name")
    try:
        model = factory(**dict(spec.kwargs))
    except TypeError as e:
        raise ModelError("kwargs", dict(spec.kwargs), f"{attr} refused them ({_first_line(e)})",
                         f"{attr}'s keyword arguments", "fix model.kwargs") from None
    if not isinstance(model, nn.Module):
        raise ModelError("arch", spec.arch, f"{attr} returned {type(model).__name__}, not an nn.Module",
                         "a factory returning an nn.Module", "return the network from the factory")
    return model


SOURCES: dict[str, Callable[[Spec, str, bool], nn.Module]] = {
    "resnet18": _ours, "torchvision": _torchvision, "timm": _timm, "python": _python}
FORMS = "resnet18, torchvision:<builder>, timm:<name>, python:<module>:<callable>"


def check_arch(arch: str) -> str | None:
    """What is wrong with the form of `arch` (None when nothing): checked without importing anything."""
    source, sep, name = arch.partition(":")
    if source not in SOURCES or (source == "resnet18") == bool(sep) or (sep and not name):
        return "not a known model source"
    return None


def build(spec: Spec, pretrained: bool = True) -> nn.Module:
    """A network of the spec: pretrained weights when the spec names them and `pretrained` (the meta-device
    plan passes False), otherwise freshly initialised."""
    if check_arch(spec.arch):
        raise ModelError("arch", spec.arch, check_arch(spec.arch), FORMS, "use one of those forms")
    name = spec.arch.partition(":")[2]
    return SOURCES[spec.source](spec, name, pretrained)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]
