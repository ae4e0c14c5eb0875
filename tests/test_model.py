"""The network (parameter counts, forward pass), its conv listing, and scoped feature-map capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import scramble_bn
from torch import nn

from model.capture import capture, watch
from model.layers import list_convs
from model.resnet import ResNet18, build, scaled

# Every conv in forward order: name, its BN, block, role, kernel, stride, input and output side (square maps).
STRUCTURE = [
    ("conv1", "bn1", "stem", "stem", 3, 1, 32, 32),
    ("layer1.0.conv1", "layer1.0.bn1", "layer1.0", "conv1", 3, 1, 32, 32),
    ("layer1.0.conv2", "layer1.0.bn2", "layer1.0", "conv2", 3, 1, 32, 32),
    ("layer1.1.conv1", "layer1.1.bn1", "layer1.1", "conv1", 3, 1, 32, 32),
    ("layer1.1.conv2", "layer1.1.bn2", "layer1.1", "conv2", 3, 1, 32, 32),
    ("layer2.0.conv1", "layer2.0.bn1", "layer2.0", "conv1", 3, 2, 32, 16),
    ("layer2.0.conv2", "layer2.0.bn2", "layer2.0", "conv2", 3, 1, 16, 16),
    ("layer2.0.shortcut.conv", "layer2.0.shortcut.bn", "layer2.0", "shortcut", 1, 2, 32, 16),
    ("layer2.1.conv1", "layer2.1.bn1", "layer2.1", "conv1", 3, 1, 16, 16),
    ("layer2.1.conv2", "layer2.1.bn2", "layer2.1", "conv2", 3, 1, 16, 16),
    ("layer3.0.conv1", "layer3.0.bn1", "layer3.0", "conv1", 3, 2, 16, 8),
    ("layer3.0.conv2", "layer3.0.bn2", "layer3.0", "conv2", 3, 1, 8, 8),
    ("layer3.0.shortcut.conv", "layer3.0.shortcut.bn", "layer3.0", "shortcut", 1, 2, 16, 8),
    ("layer3.1.conv1", "layer3.1.bn1", "layer3.1", "conv1", 3, 1, 8, 8),
    ("layer3.1.conv2", "layer3.1.bn2", "layer3.1", "conv2", 3, 1, 8, 8),
    ("layer4.0.conv1", "layer4.0.bn1", "layer4.0", "conv1", 3, 2, 8, 4),
    ("layer4.0.conv2", "layer4.0.bn2", "layer4.0", "conv2", 3, 1, 4, 4),
    ("layer4.0.shortcut.conv", "layer4.0.shortcut.bn", "layer4.0", "shortcut", 1, 2, 8, 4),
    ("layer4.1.conv1", "layer4.1.bn1", "layer4.1", "conv1", 3, 1, 4, 4),
    ("layer4.1.conv2", "layer4.1.bn2", "layer4.1", "conv2", 3, 1, 4, 4),
]

# (in, out) channels of each conv above, per width.
CHANNELS = {
    1.0: [(3, 64), (64, 64), (64, 64), (64, 64), (64, 64),
          (64, 128), (128, 128), (64, 128), (128, 128), (128, 128),
          (128, 256), (256, 256), (128, 256), (256, 256), (256, 256),
          (256, 512), (512, 512), (256, 512), (512, 512), (512, 512)],
    0.25: [(3, 16), (16, 16), (16, 16), (16, 16), (16, 16),
           (16, 32), (32, 32), (16, 32), (32, 32), (32, 32),
           (32, 64), (64, 64), (32, 64), (64, 64), (64, 64),
           (64, 128), (128, 128), (64, 128), (128, 128), (128, 128)],
}


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def tiny_model() -> ResNet18:
    torch.manual_seed(0)
    return scramble_bn(build("resnet18", 0.125, 10))


# --- the network ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width, num_classes, params", [
    (1.0, 10, 11_173_962),
    (1.0, 100, 11_220_132),  # the head grows by 512 * 90 weights + 90 biases
    (0.25, 10, 701_466),
    (0.125, 10, 176_402),
])
def test_parameter_count(width, num_classes, params):
    model = build("resnet18", width, num_classes)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("width, expected", [
    (1.0, [64, 128, 256, 512]),
    (0.25, [16, 32, 64, 128]),
    (0.125, [8, 16, 32, 64]),
    (0.01, [1, 1, 3, 5]),  # never below one channel
])
def test_scaled_stage_widths(width, expected):
    assert [scaled(c, width) for c in (64, 128, 256, 512)] == expected


def test_build_unknown_arch_names_the_known_ones():
    with pytest.raises(KeyError) as err:
        build("vgg16", 1.0, 10)
    assert err.value.args[0] == "unknown architecture 'vgg16'; known: resnet18"


def reference_forward(m: ResNet18, x: torch.Tensor) -> torch.Tensor:
    """CIFAR ResNet-18 written out by hand, for comparison with the unit-based forward."""
    out = F.relu(m.bn1(m.conv1(x)))
    for stage in (m.layer1, m.layer2, m.layer3, m.layer4):
        for b in stage:
            main = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(out)))))
            short = b.shortcut.bn(b.shortcut.conv(out)) if len(b.shortcut) else out
            out = F.relu(main + short)
    return m.linear(F.avg_pool2d(out, 4).flatten(1))


def test_forward_equals_hand_written_resnet(tiny_model):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = tiny_model(x)
        assert logits.shape == (4, 10)
        torch.testing.assert_close(logits, reference_forward(tiny_model, x), rtol=1e-5, atol=1e-5)
        # the BasicBlock modules' own forward (nn.Sequential stages) agrees with the unit-based forward
        staged = tiny_model.head(tiny_model.layer4(tiny_model.layer3(tiny_model.layer2(tiny_model.layer1(
            F.relu(tiny_model.bn1(tiny_model.conv1(x))))))))
        torch.testing.assert_close(logits, staged, rtol=1e-5, atol=1e-5)


def test_units_are_stem_then_eight_blocks(tiny_model):
    assert [u.name for u in tiny_model.units()] == [
        "stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    # identity shortcut = an empty path; a 1x1 conv shortcut only where the shape changes
    assert [len(u.paths[1]) if len(u.paths) > 1 else None for u in tiny_model.units()] == \
        [None, 0, 0, 2, 0, 2, 0, 2, 0]


# --- the conv listing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("width", [1.0, 0.25])
def test_layer_listing(width):
    convs = list_convs(build("resnet18", width, 10))
    got = [(c.name, c.bn, c.block, c.role, c.kernel_size, c.stride, c.in_hw[0], c.out_hw[0]) for c in convs]
    assert got == STRUCTURE
    assert [(c.in_channels, c.out_channels) for c in convs] == CHANNELS[width]
    assert all(c.in_hw[0] == c.in_hw[1] and c.out_hw[0] == c.out_hw[1] for c in convs)
    assert sum(not c.shortcut for c in convs) == 17
    assert [c.name for c in convs if c.shortcut] == [
        "layer2.0.shortcut.conv", "layer3.0.shortcut.conv", "layer4.0.shortcut.conv"]


def test_layer_listing_is_forward_execution_order(tiny_model):
    order = []
    convs = [(n, m) for n, m in tiny_model.named_modules() if isinstance(m, nn.Conv2d)]
    with watch(tiny_model, {n: (lambda i, o, n=n: order.append(n)) for n, _ in convs}):
        with torch.no_grad():
            tiny_model(torch.zeros(1, 3, 32, 32))
    assert len(order) == 20
    assert [c.name for c in list_convs(tiny_model)] == order


def test_listing_positions_point_at_the_modules(tiny_model):
    modules = dict(tiny_model.named_modules())
    units = tiny_model.units()
    for c in list_convs(tiny_model):
        path = units[c.unit].paths[c.path]
        assert units[c.unit].name == c.block
        assert path[c.index] is modules[c.name]
        assert path[c.index + 1] is modules[c.bn]
        assert c.path == (1 if c.shortcut else 0)


def test_consumer_is_the_blocks_conv2_for_conv1_only():
    convs = list_convs(build("resnet18", 0.125, 10))
    consumers = {c.name: c.consumer for c in convs if c.consumer}
    assert consumers == {f"layer{s}.{b}.conv1": f"layer{s}.{b}.conv2" for s in range(1, 5) for b in range(2)}
    assert {c.name: c for c in convs}["layer3.1.conv1"].consumer == "layer3.1.conv2"


def test_listing_leaves_the_model_untouched():
    model = build("resnet18", 0.125, 10)  # training mode, real weights on the CPU
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(list_convs(model)) == 20
    assert no_hooks(model)
    assert model.training is True
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_listing_keeps_a_meta_models_training_mode():
    with torch.device("meta"):
        model = build("resnet18", 0.25, 10)
    assert model.training is True
    assert len(list_convs(model)) == 20
    assert model.training is True


# --- scoped capture ------------------------------------------------------------------------------------------

def test_capture_output_and_input_match_direct_calls(tiny_model):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    names = ["conv1", "layer2.0.conv1", "layer4.1.bn2"]
    with torch.no_grad():
        with capture(tiny_model, names) as outs, capture(tiny_model, ["layer2.0.conv1"], "input") as ins:
            assert len(tiny_model.layer2[0].conv1._forward_hooks) == 2  # live inside the block
            tiny_model(x)
        stem = F.relu(tiny_model.bn1(tiny_model.conv1(x)))
        block = tiny_model.layer1(stem)
    assert sorted(outs) == sorted(names)
    assert outs["layer2.0.conv1"].shape == (2, 16, 16, 16)
    assert outs["layer4.1.bn2"].shape == (2, 64, 4, 4)
    torch.testing.assert_close(outs["conv1"], tiny_model.conv1(x).detach())
    torch.testing.assert_close(ins["layer2.0.conv1"], block)
    assert no_hooks(tiny_model)


def test_capture_keeps_the_latest_forward(tiny_model):
    a, b = torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    with torch.no_grad(), capture(tiny_model, ["conv1"], "input") as seen:
        tiny_model(a)
        tiny_model(b)
    assert torch.equal(seen["conv1"], b)


def test_capture_removes_hooks_when_the_forward_raises(tiny_model):
    with pytest.raises(RuntimeError):
        with capture(tiny_model, ["conv1", "layer3.0.shortcut.conv"]):
            assert len(tiny_model.conv1._forward_hooks) == 1
            tiny_model(torch.zeros(1, 5, 32, 32))  # 5 channels: the stem conv raises
    assert no_hooks(tiny_model)


def test_watch_removes_hooks_when_a_watcher_raises(tiny_model):
    def boom(inp, out):
        raise ValueError("watcher failed")

    with pytest.raises(ValueError, match="^watcher failed$"):
        with watch(tiny_model, {"conv1": lambda i, o: None, "layer1.0.conv1": boom}):
            with torch.no_grad():
                tiny_model(torch.zeros(1, 3, 32, 32))
    assert no_hooks(tiny_model)


def test_watch_unknown_module_raises_and_registers_nothing(tiny_model):
    with pytest.raises(KeyError) as err:
        with watch(tiny_model, {"conv1": lambda i, o: None, "layer9.conv1": lambda i, o: None,
                                "layer0": lambda i, o: None}):
            pass
    assert err.value.args[0] == "no module named layer0, layer9.conv1 in ResNet18"
    assert no_hooks(tiny_model)


def test_capture_rejects_unknown_what(tiny_model):
    with pytest.raises(ValueError) as err:
        with capture(tiny_model, ["conv1"], "weights"):
            pass
    assert str(err.value) == "what must be 'input' or 'output', got 'weights'"
    assert no_hooks(tiny_model)
