"""Coupled channel groups (model.groups): listed with Torch-Pruning, named by their first conv; a masked group
equals the physically smaller network (Torch-Pruning's removal) image by image, and the cached group cut equals
the masked forward bit for bit; the MACs and parameters a removal saves are predicted exactly."""

from __future__ import annotations

import functools

import pytest
import torch
from test_graph import build

from model.convs import list_convs
from model.cut import Cut
from model.groups import count, dependency_graph, list_groups, masked_group, remove_group, savings, tp_group
from model.savings import Savings
from model.tracing import trace

IMAGE = 32
X = torch.randn(8, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))

# (model, group): a residual stream, a block-internal one, the stem's; a mobilenet stream, a depthwise group
# (inverted-residual expansion), a plain one that ends in the classifier's input; a densenet concat group.
CASES = [
    ("ours", "layer2.0.conv2"),
    ("ours", "layer2.0.conv1"),
    ("ours", "conv1"),
    ("mobilenet_v2", "features.4.conv.2"),
    ("mobilenet_v2", "features.2.conv.0.0"),
    ("mobilenet_v2", "features.18.0"),
    ("densenet121", "features.denseblock1.denselayer1.conv2"),
]


@functools.cache
def groups(name: str) -> dict:
    return {g.name: g for g in list_groups(build(name), IMAGE)}


def lowest_l1(model: torch.nn.Module, group_name: str, k: int) -> list[int]:
    weight = model.get_submodule(group_name).weight.detach()
    return sorted(torch.argsort(weight.abs().sum((1, 2, 3)), stable=True)[:k].tolist())


def test_group_members_and_names_for_our_resnet() -> None:
    found = groups("ours")
    assert list(found) == ["conv1", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.conv2",
                           "layer2.1.conv1", "layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer4.0.conv1",
                           "layer4.0.conv2", "layer4.1.conv1"]
    stream = found["layer2.0.conv2"]
    assert {(m.name, m.dim) for m in stream.members} == {
        ("layer2.0.conv2", "out"), ("layer2.0.bn2", "out"), ("layer2.0.shortcut.conv", "out"),
        ("layer2.0.shortcut.bn", "out"), ("layer2.1.conv1", "in"), ("layer2.1.conv2", "out"), ("layer2.1.bn2", "out"),
        ("layer3.0.conv1", "in"), ("layer3.0.shortcut.conv", "in")}
    assert [p.module for p in stream.mask_points] == ["layer2.0.bn2", "layer2.0.shortcut.bn", "layer2.1.bn2"]
    assert [p.module for p in found["layer2.0.conv1"].mask_points] == ["layer2.0.bn1"]
    assert {m.name for m in found["conv1"].members if m.kind == "conv" and m.dim == "out"} == {
        "conv1", "layer1.0.conv2", "layer1.1.conv2"}


def test_mobilenet_groups_couple_depthwise_and_residual_stream() -> None:
    found = groups("mobilenet_v2")
    assert len(found) == 25
    expand = found["features.2.conv.0.0"]
    assert {(m.name, m.dim) for m in expand.members} == {
        ("features.2.conv.0.0", "out"), ("features.2.conv.0.1", "out"), ("features.2.conv.1.0", "out"),
        ("features.2.conv.1.1", "out"), ("features.2.conv.2", "in")}
    stream = found["features.4.conv.2"]
    assert [p.module for p in stream.mask_points] == ["features.4.conv.3", "features.5.conv.3", "features.6.conv.3"]
    last = found["features.18.0"]
    assert last.member("classifier.1", "in").kind == "linear" and last.member("classifier.1", "in").idxs == tuple(
        range(1280))


def test_densenet_concat_members_map_group_channels_past_the_offset() -> None:
    group = groups("densenet121")["features.denseblock1.denselayer1.conv2"]
    norm = group.member("features.denseblock1.denselayer3.norm1")
    assert norm.idxs == tuple(range(64, 96)) and norm.root == tuple(range(32))
    assert norm.local([0, 5]) == [64, 69]
    assert group.member("features.transition1.conv", "in").idxs == tuple(range(64, 96))


@pytest.mark.parametrize("name", ["ours", "mobilenet_v2"])
def test_each_group_is_torch_prunings_group_of_its_first_conv(name: str) -> None:
    model, found = build(name), groups(name)
    graph = dependency_graph(model, IMAGE)
    names = {module: path for path, module in model.named_modules()}
    order = {s.name: s.index for s in list_convs(model, IMAGE)}
    out_convs = []
    for group in found.values():
        convs = [m.name for m in group.members if m.kind == "conv" and m.dim == "out"]
        assert group.name == min(convs, key=order.get)
        members = {(m.name, m.dim) for m in group.members}
        for conv in convs:  # any member conv gives the same group back
            again = tp_group(graph, model.get_submodule(conv), [0])
            assert {(names[i.dep.target.module], "out" if graph.is_out_channel_pruning_fn(i.dep.handler) else "in")
                    for i in again.items if i.dep.target.module in names} == members
        out_convs += convs
    assert sorted(out_convs) == sorted(order)  # every conv in exactly one group


@pytest.mark.parametrize("name, group_name", CASES)
def test_masked_group_equals_removed_channels_and_counts(name: str, group_name: str) -> None:
    model, group = build(name), groups(name)[group_name]
    sites = list_convs(model, IMAGE)
    base = count(model, IMAGE)
    gm = trace(model)
    for k in sorted({1, group.channels // 2})[: 1 if name == "densenet121" else 2]:
        pruned = lowest_l1(model, group_name, k)
        smaller = remove_group(model, group, pruned, IMAGE).eval()
        with torch.inference_mode():
            with masked_group(model, group, pruned):
                masked = model(X)
            removed = smaller(X)
            cut = Cut(gm, group)
            assert torch.equal(cut.suffix(cut.prefix(X), group.keep(pruned)).logits, masked)
            assert not torch.equal(masked, model(X))
        assert torch.equal(masked.argmax(1), removed.argmax(1)), (group_name, k)
        torch.testing.assert_close(removed, masked, atol=1e-5, rtol=1e-4)
        macs, params = count(smaller, IMAGE)
        assert savings(model, group, pruned, sites) == Savings(base[1] - params, base[0] - macs), (group_name, k)
        assert params < base[1] and macs < base[0]
        assert smaller.get_submodule(group_name).out_channels == group.channels - k


def test_masked_group_hooks_do_not_outlive_the_block() -> None:
    model = build("ours")
    group = groups("ours")["layer2.0.conv2"]
    with pytest.raises(RuntimeError, match="boom"):
        with masked_group(model, group, [0]):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_count_is_flop_counter_macs_and_parameters() -> None:
    macs, params = count(build("ours"), IMAGE)
    assert params == 176_402
    convs = list_convs(build("ours"), IMAGE)
    expected = sum(s.out_channels * s.in_channels * s.kernel_size[0] * s.kernel_size[1] * s.out_hw[0] * s.out_hw[1]
                   for s in convs) + 64 * 10
    assert macs == expected


def test_group_cut_caches_every_member_point_it_cannot_reach_from_the_first() -> None:
    """layer2.0's conv2 and shortcut conv are parallel: both BN outputs are cached and masked in the suffix."""
    model = build("ours")
    group = groups("ours")["layer2.0.conv2"]
    cut = Cut(model, group)
    assert sorted(cut.cached) == ["layer2_0_bn2", "layer2_0_shortcut_bn"]
    seen: list[str] = []
    handles = [m.register_forward_hook(lambda m, a, o, n=n: seen.append(n))
               for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.inference_mode():
            cache = cut.prefix(X)
            seen.clear()
            tail = cut.suffix(cache, group.keep([0, 3]))
    finally:
        for handle in handles:
            handle.remove()
    assert seen[0] == "layer2.1.conv1" and len(seen) == 12
    assert tail.layer[:, [0, 3]].abs().sum() == 0 and tail.layer[:, 1].abs().sum() > 0


def test_groups_that_cannot_be_pruned_are_skipped(caplog) -> None:
    """A conv whose channels are the logits; a grouped (not depthwise) conv, whose channels go by groups. Each
    network's skipped groups are one log line, however many they are."""
    fully_conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                     torch.nn.Conv2d(8, 10, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with caplog.at_level("INFO", logger="model.groups"):
        assert [g.name for g in list_groups(fully_conv.eval(), 16)] == ["0"]
        regnet = [g.name for g in list_groups(build("regnet_y_400mf"), IMAGE)]
    assert [r.getMessage() for r in caplog.records if r.name == "model.groups"] == [
        "1 group skipped (1 whose channels are the network's output, first 3)",  # 16 blocks, f.a's and f.b's groups
        "32 groups skipped (32 with a grouped conv member, first trunk_output.block1.block1-0.f.a.0)"]
    assert len(regnet) == 21 and "stem.0" in regnet
    block = "trunk_output.block1.block1-0.f"
    assert f"{block}.a.0" not in regnet and f"{block}.b.0" not in regnet and f"{block}.se.fc1" in regnet
