"""sweep.stop_drop: a curve stops once a point's drop is above D beyond doubt; the K past it are recorded as
skipped (results.csv), not measured again on resume, and planned as at least the drop measured below them."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import scramble_bn

from model.convs import list_convs
from model.resnet import ResNet18
from runner.engine.criteria import Ranking
from runner.engine.measure import EvalSet, sweep_layer
from runner.errors import InputError
from runner.job.trial import point_metrics
from runner.outputs.results import COLUMNS, ResultsTable, read_rows
from runner.planning.units import unit_curves

X = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _network() -> ResNet18:
    """A random network whose head is centred and scaled on X's features: its predictions differ by image (a
    random network's do not), so that pruning flips many of them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = scramble_bn(ResNet18(width=0.125), seed=1)
    seen = {}
    handle = model.linear.register_forward_hook(lambda m, a, o: seen.setdefault("features", a[0]))
    with torch.no_grad():
        model(X)
        handle.remove()
        features = seen["features"]
        model.linear.weight.div_(features.std(0).clamp_min(1e-6))
        model.linear.bias.copy_(-(model.linear.weight @ features.mean(0)))
    return model


MODEL = _network()
CONVS = {c.name: c for c in list_convs(MODEL, 32)}
with torch.inference_mode():
    Y = MODEL(X).argmax(1)  # the unpruned network is right on every image: drops are large and certain
EVAL = EvalSet(list(X.split(32)), list(Y.split(32)), 10)
KS = [1, 2, 4, 8, 12, 16]


def _sweep(**kw):
    conv = CONVS["layer2.0.conv1"]
    order = tuple(range(conv.out_channels))
    ranking = Ranking(conv.name, "l1_norm", "output", (tuple(map(float, order)),), (order,))
    return list(sweep_layer(MODEL, conv, "output", ranking, KS, EVAL, CONVS, feature_maps=False, **kw))


def test_a_curve_stops_after_the_first_point_past_the_drop_and_records_the_rest_as_skipped():
    full = _sweep()
    stop = 20.0
    first = next(p for p in full if p.drop_low > stop)
    assert first.k < KS[-1], "the test needs a stop before the last K"
    stopped = _sweep(stop_drop=stop)
    assert [p.k for p in stopped] == KS
    for a, b in zip(full, stopped):
        assert (a.params_removed, a.macs_removed) == (b.params_removed, b.macs_removed)
        if b.k <= first.k:
            assert not b.skipped and (a.accuracy, a.loss, a.drop_low) == (b.accuracy, b.loss, b.drop_low)
        else:
            assert b.skipped and math.isnan(b.accuracy) and b.eval_images == 0


def test_skipped_points_are_rows_that_reading_leaves_out_unless_asked(tmp_path):
    points = _sweep(stop_drop=20.0)
    path = tmp_path / "results.csv"
    table = ResultsTable(path)
    for p in points:
        table.add(point_metrics(p) | {"checkpoint_sha256": "x"})
    skipped = [p.k for p in points if p.skipped]
    assert skipped and [r["k"] for r in read_rows(path)] == [p.k for p in points if not p.skipped]
    every = read_rows(path, skipped=True)
    assert [r["k"] for r in every] == KS and [r["k"] for r in every if r["skipped"]] == skipped
    assert all(r["accuracy"] is None and r["macs_removed"] > 0 for r in every if r["skipped"])
    assert ResultsTable(path).keys == {("layer2.0.conv1", "l1_norm", k, 0) for k in KS}  # resume: nothing is missing


def test_a_file_begun_by_an_older_version_keeps_its_columns(tmp_path):
    path = tmp_path / "results.csv"
    old = [c for c in COLUMNS if "recalibrated" not in c and c != "skipped"]
    path.write_text(",".join(old) + "\n")
    (p,) = _sweep()[:1]
    ResultsTable(path).add(point_metrics(p) | {"checkpoint_sha256": "x"})
    (row,) = read_rows(path)
    assert list(row) == old and row["accuracy"] == pytest.approx(p.accuracy, abs=1e-6)


def _row(k, drop, skipped=0, again=None):
    return {"layer": "a", "criterion": "l1_norm", "k": k, "repeat": 0, "accuracy_drop": drop, "skipped": skipped,
            "accuracy_drop_recalibrated": again, "macs_removed": 10 * k, "params_removed": k}


def test_the_planner_reads_a_skipped_point_as_at_least_the_drop_below_it():
    rows = [_row(1, 2.0, again=1.0), _row(2, 40.0, again=9.0), _row(3, None, 1), _row(4, None, 1)]
    (plain,) = unit_curves(rows, {"a": 4}, "l1_norm")
    assert [(o.k, o.drop) for o in plain.points] == [(0, 0.0), (1, 2.0), (2, 40.0), (3, 40.0), (4, 40.0)]
    (again,) = unit_curves(rows, {"a": 4}, "l1_norm", "recalibrated")
    assert [o.drop for o in again.points] == [0.0, 1.0, 9.0, 9.0, 9.0]
    assert [o.macs for o in again.points] == [0, 10, 20, 30, 40]


def test_recalibrated_curves_need_a_sweep_that_measured_them():
    with pytest.raises(InputError) as e:
        unit_curves([_row(1, 2.0)], {"a": 4}, "l1_norm", "recalibrated")
    assert e.value.field == "plan.curves" and "accuracy_drop_recalibrated" in str(e.value)
