"""The traced graph (model.tracing): convs listed off the graph (model.convs), and the cached cut (model.cut)
proved bit for bit against the masked eager forward, on our ResNet-18 and eight torchvision CNNs (random init,
32x32, batch 2, CPU float32).

The four large models (resnet50, densenet121, efficientnet_b0, regnet_y_400mf) are checked at a spread of 12
convs that includes every kind (first, last, depthwise, grouped, 1x1, shortcut, strided, no BN); set
PRUNE_SWEEP_ALL_CONVS=1 to check every conv of every model (about a minute on 2 cores).
"""

from __future__ import annotations

import functools
import os
from collections import Counter

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from model import layers
from model.convs import ConvSite, list_convs
from model.cut import Cut
from model.mask import MaskPoint
from model.resnet import ResNet18
from model.tracing import trace
from hand_split import Split

SMALL = ["ours", "resnet18", "mobilenet_v2", "mobilenet_v3_small", "vgg11_bn"]
QUICK = ["ours", "resnet18", "mobilenet_v2"]  # checked in the default run; the rest in the slow group
LARGE = ["resnet50", "densenet121", "efficientnet_b0", "regnet_y_400mf"]
ALL_CONVS = os.environ.get("PRUNE_SWEEP_ALL_CONVS") == "1"
SPREAD = 12
IMAGE = 32
X = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))


def calibrated(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random BN affine terms, running statistics from one batch of noise: activations of order 1 all the way
    through. (conftest's scramble_bn shrinks activations of a deep random network into denormal floats, which
    makes CPU math about 100x slower.)"""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batch
        model.train()(torch.randn(8, 3, IMAGE, IMAGE, generator=gen))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


@functools.cache
def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = ResNet18(width=0.125) if name == "ours" else getattr(torchvision.models, name)(num_classes=10)
    return calibrated(model)


@functools.cache
def traced(name: str) -> tuple[torch.fx.GraphModule, list[ConvSite]]:
    gm = trace(build(name))
    return gm, list_convs(gm, IMAGE)


def spread(sites: list[ConvSite], n: int) -> list[ConvSite]:
    """The first conv of each kind, then evenly spaced convs up to n."""
    earlier: set[str] = set()
    shortcut = []
    for s in sites:  # a conv reading the same tensor as an earlier conv: a shortcut / downsample
        if earlier & set(s.input_readers):
            shortcut.append(s)
        earlier.add(s.name)
    kinds = [sites[:1], sites[-1:], [s for s in sites if s.depthwise],
             [s for s in sites if s.groups > 1 and not s.depthwise], [s for s in sites if s.kernel_size == (1, 1)],
             shortcut, [s for s in sites if s.stride != (1, 1)], [s for s in sites if s.bn is None]]
    chosen = {kind[0].index for kind in kinds if kind}
    fill = iter(sorted(range(len(sites)), key=lambda i: (i * 7919) % len(sites)))  # a fixed, even-ish scatter
    while len(chosen) < min(n, len(sites)):
        chosen.add(next(fill))
    return [s for s in sites if s.index in chosen]


def ks(channels: int) -> list[int]:
    return sorted({1, max(channels - 1, 1) if channels < 4 else channels // 2})


def keep(channels: int, k: int, seed: int) -> torch.Tensor:
    mask = torch.ones(channels)
    mask[torch.randperm(channels, generator=torch.Generator().manual_seed(seed))[:k]] = 0
    return mask


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in SMALL + LARGE])
def test_cut_equals_masked_full_forward_bit_for_bit(name: str) -> None:
    gm, sites = traced(name)
    checked = sites if name in SMALL or ALL_CONVS else spread(sites, SPREAD)
    with torch.inference_mode():
        plain = build(name)(X)
        for site in checked:
            for target in ("output", "input"):
                cut = Cut(gm, site, target)
                cache = cut.prefix(X)
                kept = [t.clone() for t in cache]
                assert torch.equal(cut.suffix(cache, None).logits, plain), (site.name, target)
                channels = site.channels(target)
                for k in ks(channels):
                    mask = keep(channels, k, seed=site.index)
                    full = cut.full(X, mask)
                    assert torch.equal(cut.suffix(cache, mask).logits, full), (site.name, target, k)
                assert not torch.equal(full, plain), (site.name, target)  # the mask did change something
                assert all(torch.equal(a, b) for a, b in zip(cache, kept)), (site.name, target)  # cache intact


def test_spread_covers_every_kind() -> None:
    names = {s.name for s in spread(traced("regnet_y_400mf")[1], SPREAD)}
    assert len(names) == SPREAD
    assert {"stem.0", "trunk_output.block1.block1-0.proj.0", "trunk_output.block1.block1-0.f.b.0",
            "trunk_output.block1.block1-0.f.se.fc1", "trunk_output.block4.block4-5.f.c.0"} <= names


def test_list_convs_matches_the_hand_written_listing() -> None:
    model = build("ours")
    expected = [(c.name, c.bn, c.in_channels, c.out_channels, (c.kernel_size,) * 2, (c.stride,) * 2, c.in_hw,
                 c.out_hw) for c in layers.list_convs(model)]
    found = [(s.name, s.bn, s.in_channels, s.out_channels, s.kernel_size, s.stride, s.in_hw, s.out_hw)
             for s in list_convs(model, 32)]
    assert found == expected
    assert len(found) == 20 and sum(".shortcut.conv" in f[0] for f in found) == 3


def test_list_convs_sees_grouped_depthwise_and_bn_less_convs() -> None:
    sites = {s.name: s for s in traced("mobilenet_v3_small")[1]}
    dw = sites["features.1.block.0.0"]
    assert (dw.groups, dw.depthwise, dw.bn, dw.stride, dw.in_hw, dw.out_hw) == (16, True, "features.1.block.0.1",
                                                                                 (2, 2), (16, 16), (8, 8))
    se = sites["features.1.block.1.fc1"]
    assert (se.bn, se.kernel_size, se.in_hw, se.readers) == (None, (1, 1), (1, 1), ("features.1.block.1.activation",))
    shortcut = {s.name: s for s in traced("resnet18")[1]}["layer2.0.downsample.0"]
    assert shortcut.input_readers == ("layer2.0.conv1",) and shortcut.bn == "layer2.0.downsample.1"


def test_tail_equals_the_hand_written_split() -> None:
    model = build("ours")
    sites = {s.name: s for s in list_convs(model, 32)}
    for conv in layers.list_convs(model)[::3]:
        for target in ("output", "input"):
            mask = keep(conv.out_channels if target == "output" else conv.in_channels, 2, seed=conv.index)
            with torch.inference_mode():
                split = Split(model, conv, target)
                cut = Cut(model, sites[conv.name], target)
                a, b = split.suffix(split.prefix(X), mask), cut.suffix(cut.prefix(X), mask)
            assert torch.equal(a.logits, b.logits) and torch.equal(a.layer, b.layer), (conv.name, target)
            assert torch.equal(a.final, b.final), (conv.name, target)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, target", [("conv1", "output"), ("layer2.0.conv1", "input"),
                                          ("layer3.0.shortcut.conv", "output")])
def test_suffix_runs_the_same_ops_as_the_hand_written_split(name: str, target: str) -> None:
    """In place where the eager model was and nothing else reads the value: no extra allocations."""
    model = build("ours")
    conv = {c.name: c for c in layers.list_convs(model)}[name]
    split, cut = Split(model, conv, target), Cut(model, {s.name: s for s in list_convs(model, 32)}[name], target)
    mask = keep(conv.out_channels if target == "output" else conv.in_channels, 2, seed=0)
    with torch.inference_mode():
        a, b = split.prefix(X), cut.prefix(X)
        with _Ops() as by_split:
            split.suffix(a, mask)
        with _Ops() as by_cut:
            cut.suffix(b, mask)
    assert by_cut.seen == by_split.seen
    assert by_cut.seen["aten.relu_.default"] > 0


@pytest.mark.parametrize("name, head", [("resnet18", "avgpool"), ("vgg11_bn", "avgpool"),
                                        ("mobilenet_v3_small", "avgpool"), ("efficientnet_b0", "avgpool")])
def test_final_is_the_feature_map_entering_the_global_pool(name: str, head: str) -> None:
    gm, sites = traced(name)
    model = build(name)
    seen = {}
    handle = model.get_submodule(head).register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    try:
        with torch.inference_mode():
            model(X)
            tail = Cut(gm, sites[-1], "output").suffix(Cut(gm, sites[-1], "output").prefix(X), None)
    finally:
        handle.remove()
    assert tail.final.dim() == 4 and torch.equal(tail.final, seen["x"])


def _conv_calls(model: nn.Module) -> tuple[list[str], list]:
    calls: list[str] = []
    handles = [m.register_forward_hook(lambda m, a, o, n=n: calls.append(n))
               for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return calls, handles


CONVS = [c.name for c in layers.list_convs(ResNet18(width=0.125))]


@pytest.mark.parametrize("name, target, suffix_convs, cached", [
    ("layer4.1.conv2", "output", [], 2),  # the BN output and the block's input (the identity shortcut)
    ("layer4.1.conv2", "input", ["layer4.1.conv2"], 2),  # conv2's input and the block's input
    ("layer2.0.conv1", "output", CONVS[6:7] + CONVS[8:], 2),  # the shortcut conv's BN output is cached, not rerun
    ("conv1", "input", CONVS, 1),  # the image itself
])
def test_prefix_runs_only_what_the_cache_needs_and_suffix_only_the_tail(name, target, suffix_convs,
                                                                        cached) -> None:
    model = build("ours")
    site = {s.name: s for s in list_convs(model, 32)}[name]
    cut = Cut(model, site, target)
    calls, handles = _conv_calls(model)
    try:
        with torch.inference_mode():
            cache = cut.prefix(X)
            in_prefix = list(calls)
            calls.clear()
            cut.suffix(cache, keep(site.channels(target), 1, 0))
    finally:
        for handle in handles:
            handle.remove()
    assert in_prefix == [c for c in CONVS if c not in suffix_convs]
    assert calls == suffix_convs
    assert len(cache) == len(cut.cached) == cached
    if target == "output":
        assert site.bn.replace(".", "_") in cut.cached  # the value at the mask point


def test_traced_copy_has_no_in_place_ops_and_leaves_the_model_alone() -> None:
    model = build("resnet18")
    gm, sites = traced("resnet18")
    inplace = [n for n in gm.graph.nodes if n.op == "call_module" and getattr(gm.get_submodule(n.target),
                                                                                  "inplace", False)]
    assert inplace == []
    assert all(n.target.__name__ != "iadd" for n in gm.graph.nodes if n.op == "call_function")
    assert model.relu.inplace is True and model.layer1[0].relu.inplace is True  # the caller's model untouched
    assert gm.get_submodule("layer1.0.conv1") is model.layer1[0].conv1  # weights shared, not copied
    cut = Cut(gm, {s.name: s for s in sites}["layer1.0.conv2"], "output")
    with torch.inference_mode():
        cache = cut.prefix(X)
        before = [t.clone() for t in cache]
        mask = keep(64, 32, 0)
        first = cut.suffix(cache, mask).logits
        second = cut.suffix(cache, mask).logits
    assert all(torch.equal(a, b) for a, b in zip(cache, before))
    assert torch.equal(first, second)


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x  # data-dependent control flow: not traceable


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.body = nn.Sequential(nn.ReLU(), _Gate())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_untraceable_model_names_the_module() -> None:
    with pytest.raises(ValueError) as err:
        trace(_Untraceable())
    assert str(err.value).startswith("cannot trace _Untraceable with torch.fx: tracing failed in module 'body.1' "
                                     "(_Gate): TraceError: symbolically traced variables cannot be used as inputs "
                                     "to control flow")


class _InPlace(nn.Module):
    """In-place ops whose result is not rebound: later readers must see the mutated value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        z = self.conv2(y)
        y.relu_()  # not rebound: y is read again below, mutated
        z += y
        torch.nn.functional.relu(z, inplace=True)
        torch.sigmoid_(y)
        t = z * 2
        t.zero_()  # no out-of-place twin: done on a copy
        z = z.mul_(y) + t
        return self.fc(z.mean((2, 3)))


class _InPlaceView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y[:, :2].mul_(2)  # y, read below, changes too
        return y.mean((2, 3))


def test_in_place_ops_become_out_of_place_without_changing_numbers() -> None:
    model = calibrated(_InPlace())
    gm = trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_method" and n.target.endswith("_")] == ["zero_"]
    zero = next(n for n in gm.graph.nodes if n.target == "zero_")
    assert zero.args[0].target == "clone"
    sites = list_convs(gm, 8)
    with torch.inference_mode():
        assert torch.equal(gm(X), model(X))
        for site in sites:
            for target in ("output", "input"):
                cut = Cut(gm, site, target)
                mask = keep(site.channels(target), 2, 0)
                assert torch.equal(cut.suffix(cut.prefix(X), mask).logits, cut.full(X, mask))


def test_in_place_write_into_a_view_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot make _InPlaceView safe for caching: 'mul_' \\(mul\\) writes in "
                                         "place into a view \\('getitem'\\); write into a copy instead"):
        trace(_InPlaceView())


def test_bad_target_and_point_errors() -> None:
    gm, sites = traced("ours")
    with pytest.raises(ValueError, match="target must be one of \\('output', 'input'\\), got 'bn'"):
        Cut(gm, sites[0], "bn")
    with pytest.raises(ValueError, match="module 'layer1.0.relu' is called 0 times"):
        Cut(gm, type("Unit", (), {"mask_points": [MaskPoint("layer1.0.relu")]})(), "output")
