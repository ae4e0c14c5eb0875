"""Adaptive BN in the cached engine against a reference that knows nothing of caching: a deep copy of the whole
network, masked by hooks, whose reached BatchNorm layers are reset and re-estimated on the same images in the
same batches, then evaluated. Equal image by image, for both targets, for layers and for groups, on our
ResNet-18 and on torchvision's MobileNetV2."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import scramble_bn
from torch import nn

from model.convs import list_convs
from model.groups import list_groups
from model.mask import MaskPoint, masked_points
from model.resnet import ResNet18
from model.zoo import Spec, build
from runner.engine.adaptive_bn import downstream_norms
from runner.engine.criteria import Ranking
from runner.engine.measure import EvalSet, sweep_layer

GEN = torch.Generator().manual_seed(3)
X = torch.randn(12, 3, 32, 32, generator=GEN)
Y = torch.randint(0, 10, (12,), generator=GEN)
R = torch.randn(10, 3, 32, 32, generator=GEN) * 1.3 + 0.2  # other statistics than the trained ones
BATCH = 4  # eval and recalibration batches: 4, 4, 4 and 4, 4, 2


def _nets():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ours = scramble_bn(ResNet18(width=0.125), seed=1)
        torch.manual_seed(0)
        mobile = scramble_bn(build(Spec("torchvision:mobilenet_v2", num_classes=10, kwargs={"width_mult": 0.25})),
                             seed=1)
    return {"resnet18": ours, "mobilenet_v2": mobile}


NETS = _nets()


def reached_by_hooks(model: nn.Module, points: list[MaskPoint], keep: torch.Tensor) -> list[str]:
    """The BatchNorm layers whose input a mask at these points changes, seen by running the network with and
    without one (a probe that scales every channel: a pruned channel may be dead after a ReLU for these images)."""
    keep = torch.full_like(keep, 3.0)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0].clone()))
               for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model(X)
            with masked_points(model, points, keep):
                model(X)
    finally:
        for h in handles:
            h.remove()
    return sorted(n for n, (a, b) in seen.items() if not torch.equal(a, b))


def reference(model: nn.Module, points: list[MaskPoint], keep: torch.Tensor) -> tuple[np.ndarray, float]:
    """Per-image verdicts and mean loss of a deep copy, masked, its reached BN re-estimated on R (whole network)."""
    names = reached_by_hooks(model, points, keep)
    net = copy.deepcopy(model).eval()
    with masked_points(net, points, keep), torch.no_grad():
        for name in names:
            bn = net.get_submodule(name)
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for x in R.split(BATCH):
            net(x)
        net.eval()
        logits = torch.cat([net(x) for x in X.split(BATCH)])
    return (logits.argmax(1) == Y).numpy(), float(F.cross_entropy(logits, Y, reduction="sum")) / len(Y)


def _sets():
    return EvalSet(list(X.split(BATCH)), list(Y.split(BATCH)), 10), EvalSet(list(R.split(BATCH)),
                                                                          list(Y[:10].split(BATCH)), 10)


def _order(channels: int) -> tuple[int, ...]:
    return tuple(torch.randperm(channels, generator=torch.Generator().manual_seed(channels)).tolist())


def _check(model, unit, target, points_of, ks, channels):
    evalset, recal = _sets()
    order = _order(channels)
    ranking = Ranking(unit.name, "l1_norm", target, (tuple(float(i) for i in range(channels)),), (order,))
    convs = {c.name: c for c in list_convs(model, 32)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    points = list(sweep_layer(model, unit, target, ranking, ks, evalset, convs, feature_maps=False,
                              recalibration=recal))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the network was left changed"
    for p in points:
        keep = torch.ones(channels)
        keep[list(order[:p.k])] = 0
        correct, loss = reference(model, points_of, keep)
        r = p.recalibrated
        assert r.images == 10
        assert np.array_equal(r.correct, correct), (unit.name, p.k)
        assert r.accuracy == pytest.approx(100 * correct.mean(), abs=1e-9)
        assert r.loss == pytest.approx(loss, rel=1e-5, abs=1e-7), (unit.name, p.k)
    return points


@pytest.mark.parametrize("target", ["output", "input"])
@pytest.mark.parametrize("net", list(NETS))
def test_adaptive_bn_of_a_layer_equals_the_whole_network_reference(net, target):
    model = NETS[net]
    sites = [s for s in list_convs(model, 32) if not (target == "input" and s.depthwise)]
    picked = sites[1:: max(1, len(sites) // 4)][:4]
    changed = 0
    for site in picked:
        channels = site.channels(target)
        points = _check(model, site, target, [site.mask_point(target)], [1, channels // 2], channels)
        changed += sum(p.recalibrated.accuracy != p.accuracy or p.recalibrated.loss != p.loss for p in points)
    assert changed > 0, "adaptive BN changed nothing: the test would not see a wrong estimate"


@pytest.mark.parametrize("net", list(NETS))
def test_adaptive_bn_of_a_group_equals_the_whole_network_reference(net):
    model = NETS[net]
    groups = list_groups(model, 32)
    residual = next(g for g in groups if sum(m.kind == "conv" and m.dim == "out" for m in g.members) > 1)
    for group in (groups[1], residual):
        _check(model, group, "output", list(group.mask_points), [1, group.channels // 2], group.channels)


def test_the_engine_reaches_the_layers_the_mask_changes():
    model = NETS["resnet18"]
    site = next(s for s in list_convs(model, 32) if s.name == "layer4.0.conv1")
    keep = torch.ones(site.out_channels)
    keep[:3] = 0
    by_hooks = reached_by_hooks(model, [site.mask_point("output")], keep)
    assert sorted(downstream_norms(model, [site.bn])) == by_hooks == ["layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2"]


@pytest.mark.parametrize("residual", [False, True])
def test_a_plan_scored_with_adaptive_bn_equals_the_sweep_point_of_its_one_group(residual):
    """The prune job's adaptive BN (masks of the physical removal, on the whole network) and the sweep's
    (a group's mask points, on the cached suffix) agree on a plan that prunes one group, image by image."""
    from runner.planning.adaptive import score_recalibrated

    model = NETS["resnet18"]
    groups = list_groups(model, 32)
    group = next(g for g in groups[1:] if (sum(m.kind == "conv" and m.dim == "out" for m in g.members) > 1)
                 == residual)
    evalset, recal = _sets()
    order = _order(group.channels)
    ranking = Ranking(group.name, "l1_norm", "output", (tuple(float(i) for i in range(group.channels)),), (order,))
    convs = {c.name: c for c in list_convs(model, 32)}
    (point,) = sweep_layer(model, group, "output", ranking, [group.channels // 2], evalset, convs,
                           feature_maps=False, recalibration=recal)
    removal = {group.name: sorted(group.member(group.name, "out").local(order[:point.k]))}
    scored = score_recalibrated(model, removal, 32, recal, evalset)
    assert np.array_equal(scored.correct, point.recalibrated.correct)
    assert scored.loss == pytest.approx(point.recalibrated.loss, rel=1e-5)
    assert point.recalibrated.loss != point.loss


def test_grid_checks_of_adaptive_bn(tmp_path):
    from e2e_helpers import grid_dict

    from runner.config import parse_grid
    from runner.errors import InputError
    from runner.inputs.trials import plan_trials
    from runner.job.prune import _check_plannable

    with pytest.raises(InputError) as e:
        plan_trials(parse_grid(grid_dict(tmp_path, sweep={"bn_recalibration": 101}), "g.yaml"))
    assert str(e.value) == ("sweep.bn_recalibration: more images than the calibration hold-out has (100): "
                            "got 101; allowed: 0 .. 100; fix: lower it, or raise data.calibration_size")
    with pytest.raises(InputError) as e:
        _check_plannable(parse_grid(grid_dict(tmp_path, plan={"curves": "recalibrated"}), "g.yaml"))
    assert e.value.field == "plan.curves" and "sweep.bn_recalibration" in str(e.value)
    grid = parse_grid(grid_dict(tmp_path, sweep={"bn_recalibration": 100}, plan={"curves": "recalibrated"}), "g.yaml")
    assert _check_plannable(grid) == "mean_activation" and len(plan_trials(grid).trials) > 0


@pytest.mark.slow
def test_a_sweep_with_adaptive_bn_writes_both_curves_and_resumes_with_nothing_to_do(ray_session, sweep_checkpoint,
                                                                                    tmp_path):
    """Through Ray Tune: every row carries both curves and N, the report and plots show both and name them, and
    a resumed sweep measures nothing again (skipped points count as done)."""
    from e2e_helpers import e2e, grid_dict, write_grid

    from runner.job.sweep import Options, run_sweep
    from runner.outputs.results import read_rows

    grid = grid_dict(tmp_path, e2e(sweep_checkpoint), name="adaptive", sweep={
        "layers": ["conv1", "layer2.0.conv1"], "k": {"fractions": [0.25, 0.5, 1.0]}, "criteria": ["l1_norm"],
        "bn_recalibration": 60, "stop_drop": 1.0})
    path = write_grid(tmp_path / "adaptive.yaml", grid)
    outcome = run_sweep(Options(str(path)))
    every = read_rows(outcome.folder / "results.csv", skipped=True)
    assert outcome.points == outcome.expected == len(every) == 6 and not outcome.failed
    measured = [r for r in every if not r["skipped"]]
    assert measured and all(r["bn_recalibrated"] == 60 and r["accuracy_recalibrated"] is not None for r in measured)
    for r in measured:
        assert r["accuracy_drop_recalibrated"] == pytest.approx(r["baseline_accuracy"] - r["accuracy_recalibrated"])
    for r in every:  # a curve stops only after a point whose lower end passed 1 point (either curve)
        if r["skipped"]:
            before = [m for m in measured if m["layer"] == r["layer"] and m["k"] < r["k"]]
            assert any(min(m["drop_low"], m["drop_low_recalibrated"]) > 1.0 for m in before)
    text = (outcome.folder / "report.md").read_text()
    assert "## After adaptive BN: the recalibrated curves" in text and "*Plain*" in text
    assert (outcome.folder / "plots" / "accuracy_vs_k_recalibrated.png").is_file()
    again = run_sweep(Options(str(path), resume=True))
    assert again.measured == 0 and again.points == 6
