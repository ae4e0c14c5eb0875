"""Physical removal with Torch-Pruning: counted MACs and params by hand, the pruned model equal to the masked one
(our ResNet-18 at width 0.125 and torchvision's mobilenet_v2), units that can be removed alone, bad removals."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from model.resnet import ResNet18
from runner.errors import InputError
from runner.planning.removal import Counts, counter, counts, masked, pruned_copy, removable_alone, removal_from



def calibrated(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine terms and BN statistics of random images, so that logits depend on the image (with
    conftest's scramble_bn, mobilenet_v2's logits at 32x32 are the same for every image)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the statistics of the batch below
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(0.4 * torch.rand(m.num_features, generator=gen) - 0.2)
    with torch.no_grad():
        model.train()(torch.randn(64, 3, 32, 32, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return calibrated(ResNet18(width=0.125))


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return calibrated(torchvision.models.mobilenet_v2(num_classes=10))


def images(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_count_is_macs_and_params_by_hand() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert counts(conv, 32) == Counts(8 * 3 * 9 * 32 * 32, 8 * 3 * 9)
    net = nn.Sequential(conv, nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    assert counts(net, 32) == Counts(8 * 3 * 9 * 32 * 32 + 8 * 10, 8 * 3 * 9 + 2 * 8 + 8 * 10 + 10)  # BN: no MACs


def test_a_pruned_block_conv1_saves_its_filters_bn_and_the_next_convs_input_slice(resnet) -> None:
    # layer1.0.conv1: 8 -> 8 channels, 3x3, 32x32. Removing 3 output channels removes 3 of its filters
    # (3*8*9 weights, 3*8*9*1024 MACs), 3 BN channels (6 params) and 3 input slices of conv2 (8*3*9 weights)
    pruned = pruned_copy(resnet, {"layer1.0.conv1": [0, 3, 5]}, 32)
    base, after = counts(resnet, 32), counts(pruned, 32)
    assert base.macs - after.macs == 2 * 3 * 8 * 9 * 1024 == 442_368
    assert base.params - after.params == 3 * 8 * 9 + 6 + 8 * 3 * 9 == 438
    assert pruned.layer1[0].conv1.out_channels == 5 and pruned.layer1[0].conv2.in_channels == 5
    assert resnet.layer1[0].conv1.out_channels == 8  # the base is left as it was


@pytest.mark.parametrize("removal", [
    {"layer1.0.conv1": [0, 3, 5]},
    {"layer1.0.conv1": [0, 3, 5], "layer2.1.conv1": [1, 2, 3, 4, 5, 6, 7], "layer4.0.conv1": list(range(0, 64, 2))},
    {"conv1": [1, 2], "layer1.0.conv1": [0, 4]},  # the stem's residual-stream group and a block's conv1 together
], ids=["one", "three", "group"])
def test_resnet_pruned_equals_masked(resnet, removal) -> None:
    x = images()
    with masked(resnet, removal, 32), torch.no_grad():
        want = resnet(x)
    with torch.no_grad():
        got = pruned_copy(resnet, removal, 32).eval()(x)
    assert torch.equal(got.argmax(1), want.argmax(1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(resnet(x), want, rtol=1e-3, atol=1e-3)  # the masks did something
    assert want.std(0).mean() > 0.05  # and the logits depend on the image


@pytest.mark.parametrize("removal", [
    {"features.18.0": list(range(0, 1280, 3))},  # the last 1x1 conv, read by the classifier only
    {"features.17.conv.2": [0, 10, 100, 319]},  # a projection with no residual after it
    {"features.2.conv.0.0": [1, 5, 7, 50]},  # an expansion conv with its depthwise conv (a group)
], ids=["last", "projection", "depthwise"])
def test_mobilenet_v2_pruned_equals_masked(mobilenet, removal) -> None:
    x = images()
    with masked(mobilenet, removal, 32), torch.no_grad():
        want = mobilenet(x)
    with torch.no_grad():
        got = pruned_copy(mobilenet, removal, 32).eval()(x)
    assert torch.equal(got.argmax(1), want.argmax(1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(mobilenet(x), want, rtol=1e-3, atol=1e-3)
    assert want.std(0).mean() > 0.05 and len(set(want.argmax(1).tolist())) > 3


def test_units_that_can_be_removed_alone(resnet, mobilenet) -> None:
    got = removable_alone(resnet, ["layer1.0.conv1", "layer3.1.conv1", "layer1.0.conv2", "layer2.0.shortcut.conv"], 32)
    assert got["layer1.0.conv1"] is None and got["layer3.1.conv1"] is None
    assert got["layer1.0.conv2"] == ("its channels are tied to conv1, layer1.1.conv2 (residual addition, "
                                     "concatenation or depthwise conv): plan it as a group")
    assert got["layer2.0.shortcut.conv"].startswith("its channels are tied to layer2.0.conv2, layer2.1.conv2 ")
    got = removable_alone(mobilenet, ["features.18.0", "features.2.conv.0.0"], 32)
    assert got["features.18.0"] is None
    assert got["features.2.conv.0.0"].startswith("its channels are tied to features.2.conv.1.0 ")


@pytest.mark.parametrize("removal, message", [
    ({"layer1.0.bn1": [0]}, "plan['layer1.0.bn1']: not a conv of the model: got 'layer1.0.bn1'; allowed: conv names "
                            "such as conv1, layer1.0.conv1, layer1.0.conv2; fix: rebuild the plan with prune-sweep "
                            "prune (do not edit it by hand)"),
    ({"layer1.0.conv1": list(range(8))}, "plan['layer1.0.conv1']: K larger than the unit's channels allow: got 8; "
                                         "allowed: K from 0 to 7 (layer1.0.conv1 has 8 output channels; at least one "
                                         "must stay); fix: rebuild the plan with prune-sweep prune (do not edit it by "
                                         "hand)"),
    ({"layer1.0.conv1": [1, 1]}, "plan['layer1.0.conv1']: channel indices out of range or repeated: got [1, 1]; "
                                 "allowed: distinct integers 0..7 (layer1.0.conv1 has 8 output channels); fix: "
                                 "rebuild the plan with prune-sweep prune (do not edit it by hand)"),
])
def test_a_bad_removal_is_one_line(resnet, removal, message) -> None:
    with pytest.raises(InputError) as e:
        pruned_copy(resnet, removal, 32)
    assert str(e.value) == message


def test_two_units_of_one_group_are_refused(resnet) -> None:
    with pytest.raises(ValueError, match="units conv1 and layer1.0.conv2 are one group: plan one of them"):
        pruned_copy(resnet, {"conv1": [0], "layer1.0.conv2": [1]}, 32)


def test_a_plans_removal_comes_from_the_rankings_and_is_counted(resnet) -> None:
    orders = {"layer1.0.conv1": [5, 0, 3, 1, 2, 4, 6, 7], "layer2.0.conv1": list(range(15, -1, -1))}
    assert removal_from({"layer1.0.conv1": 3, "layer2.0.conv1": 0}, orders) == {"layer1.0.conv1": [0, 3, 5]}
    kept = counter(resnet, orders, "macs", 32)
    assert kept({"layer1.0.conv1": 3}) == counts(resnet, 32).macs - 442_368
