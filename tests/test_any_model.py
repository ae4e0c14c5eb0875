"""Any network from model.zoo through the sweep's engine: the plan lists its convs from the graph, and the
sweep's cached suffix gives exactly the logits of the full masked forward (torchvision resnet18, mobilenet_v2)."""

from __future__ import annotations

import pytest
import torch
from conftest import scramble_bn
from e2e_helpers import grid_dict

from model.convs import list_convs
from model.zoo import Spec, build
from runner.config import parse_grid
from runner.engine.measure import traced
from runner.engine.prune import keep_mask, masked, savings
from runner.inputs.trials import plan_trials
from model.cut import Cut

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
NETS = {
    "resnet18": Spec("torchvision:resnet18", num_classes=10),
    "mobilenet_v2": Spec("torchvision:mobilenet_v2", num_classes=10, kwargs={"width_mult": 0.25}),
}


@pytest.fixture(scope="module", params=list(NETS))
def net(request):
    torch.manual_seed(0)
    model = scramble_bn(build(NETS[request.param]), seed=1).eval()
    return model, list_convs(model, 32)


@pytest.mark.parametrize("target", ["output", "input"])
def test_cached_suffix_equals_full_masked_forward(net, target):
    model, sites = net
    gm = traced(model)
    picked = sites[:: max(1, len(sites) // 6)]
    for site in picked:
        if target == "input" and site.depthwise:
            continue
        n = site.channels(target)
        pruned = list(range(0, n, 3))
        cut = Cut(gm, site, target)
        with torch.inference_mode():
            with masked(model, site, target, pruned):
                full = model(X)
            cache = cut.prefix(X)
            tail = cut.suffix(cache, keep_mask(n, pruned))
        assert torch.equal(tail.logits, full), site.name


SIDE = {  # the projection shortcuts, found from the graph (RegNet's `proj` runs before the `f` it is added to)
    "resnet18": [f"layer{i}.0.downsample.0" for i in (2, 3, 4)],
    "resnet50": [f"layer{i}.0.downsample.0" for i in (1, 2, 3, 4)],
    "regnet_x_400mf": [f"trunk_output.block{i}.block{i}-0.proj.0" for i in (1, 2, 3, 4)],
    "mobilenet_v2": [],  # identity shortcuts only
    "efficientnet_b0": [],
}


@pytest.mark.parametrize("arch", list(SIDE))
def test_side_branches_are_the_shorter_path_into_a_residual_add(arch):
    convs = list_convs(build(Spec(f"torchvision:{arch}", num_classes=10)), 32)
    assert [c.name for c in convs if c.side] == SIDE[arch]


def test_side_branches_and_consumers_of_torchvision_resnet18():
    sites = {s.name: s for s in list_convs(build(NETS["resnet18"]), 32)}
    assert sites["layer1.0.conv1"].consumer == "layer1.0.conv2" and sites["layer1.0.conv2"].consumer is None
    c1 = sites["layer1.0.conv1"]  # 64 -> 64 3x3 at 8x8 (32 px input, stride-2 stem and max-pool)
    assert savings(c1, "output", 1, sites).params == 64 * 9 + 2 + 64 * 9


def test_plan_of_a_torchvision_grid(tmp_path):
    raw = grid_dict(tmp_path)
    raw["model"] = {"arch": "torchvision:mobilenet_v2", "kwargs": {"width_mult": 0.25}}
    raw["sweep"]["include_shortcuts"] = True
    plan = plan_trials(parse_grid(raw, "g.yaml"))
    assert len(plan.convs) == 52 and plan.convs[0].name == "features.0.0"
    assert plan.describe()[0] == "convs found in the graph: 52"


def test_group_sweep_equals_the_full_forward_with_the_group_masked(tmp_path):
    """unit: group through the engine: the group's channels masked in every member, measured on the cached
    suffix, give the accuracy and loss of the whole network run with the group masked by hooks."""
    from model.groups import masked_group
    from runner.engine.criteria import group_rankings, rank_all
    from runner.engine.evaluate import evaluate
    from runner.engine.measure import EvalSet, sweep_layer

    raw = grid_dict(tmp_path)
    raw["model"] = {"arch": "torchvision:mobilenet_v2", "kwargs": {"width_mult": 0.25}}
    raw["sweep"].update(unit="group", criteria=["l1_norm", "random"], k=[1, 4])
    plan = plan_trials(parse_grid(raw, "g.yaml"))
    assert plan.unit == "group" and len(plan.groups) == len(plan.layers) > 10
    torch.manual_seed(0)
    model = scramble_bn(build(NETS["mobilenet_v2"]), seed=1).eval()
    rankings = group_rankings(plan.groups, rank_all(model, list(plan.ranked), ["l1_norm", "random"], "output",
                                                    X, torch.tensor([1, 2]), 2, 0))
    y = torch.tensor([3, 5])
    evalset = EvalSet([X], [y], 10)
    convs = {c.name: c for c in plan.convs}
    residual = next(g for g in plan.groups if sum(m.kind == "conv" and m.dim == "out" for m in g.members) > 1)
    for group in (plan.groups[1], residual):
        ranking = rankings[(group.name, "l1_norm")]
        points = list(sweep_layer(model, plan.units[group.name], "output", ranking, [1, 4], evalset, convs,
                                  feature_maps=False))
        assert [p.unit for p in points] == ["group", "group"] and points[1].macs_removed > points[0].macs_removed > 0
        for p in points:
            with torch.inference_mode(), masked_group(model, group, ranking.order[:p.k]):
                full = evaluate(model, [X], [y], 10).result()
            assert (p.accuracy, p.loss) == (full.accuracy, full.loss), (group.name, p.k)
