"""W&B as its users use it (runner.outputs.tracking, in process, no run started): the mode W&B's own switch
selects, settings this wandb has, run ids stable across --resume, and a trial run's summary that describes the
layer rather than its last K. The runs themselves are read back from real sweeps in tests/test_sweep.py."""

from __future__ import annotations

import pytest

from runner.outputs.report import fraction_label, trial_summary
from runner.outputs.tracking import model_artifact, resolve_mode, run_id, usable_settings

KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    return monkeypatch


@pytest.mark.parametrize("env, key, expected", [
    ({}, False, "offline"), ({}, True, "online"),
    ({"WANDB_MODE": "disabled"}, True, "disabled"), ({"WANDB_MODE": "offline"}, True, "offline"),
    ({"WANDB_MODE": "dryrun"}, True, "offline"), ({"WANDB_MODE": "online"}, False, "online"),
    ({"WANDB_MODE": "Disabled "}, True, "disabled"), ({"WANDB_DISABLED": "true"}, True, "disabled"),
    ({"WANDB_MODE": "sometimes"}, True, "online")])  # a value W&B does not know: the key decides
def test_auto_honours_wandb_mode(clean_env, env, key, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    if key:
        clean_env.setenv("WANDB_API_KEY", KEY)
    assert resolve_mode("auto") == expected


@pytest.mark.parametrize("mode", ["online", "offline", "disabled"])
def test_an_explicit_mode_is_kept(clean_env, mode):
    clean_env.setenv("WANDB_MODE", "disabled" if mode != "disabled" else "online")
    assert resolve_mode(mode) == mode


def test_private_settings_only_where_wandb_has_them():
    class Old:  # a wandb whose Settings lack one of the private settings
        model_fields = {"console": None, "silent": None, "x_disable_stats": None}

    values = {"console": "off", "silent": True, "x_disable_stats": True, "x_disable_meta": True}
    assert usable_settings(Old, values) == {"console": "off", "silent": True, "x_disable_stats": True}
    assert usable_settings(object, values) == {"console": "off", "silent": True}  # no field list: no private ones
    import wandb

    assert usable_settings(wandb.Settings, values) == values  # the installed wandb has them all


def test_run_ids_are_stable_per_sweep_and_distinct_per_run():
    names = ["layer1.0.conv1/l1_norm", "layer1.0.conv1/random", "layer1.0.conv2/l1_norm", "summary", "train"]
    ids = [run_id("1a2b3c4d", n) for n in names]
    assert ids == [run_id("1a2b3c4d", n) for n in names]  # the same every time
    assert len(set(ids)) == len(ids) and len(set(ids) & {run_id("ffff0000", n) for n in names}) == 0
    assert ids[-2:] == ["1a2b3c4d-summary", "1a2b3c4d-train"]
    assert all(len(i) <= 64 and all(ch.isalnum() or ch == "-" for ch in i) for i in ids)
    assert run_id(None, "summary") is None  # no sweep id: W&B makes a new one


def test_model_artifact_name():
    assert model_artifact("/x/checkpoints/cifar10 resnet18.pt", "ab" * 32) == \
        "checkpoint-cifar10-resnet18:sha256-abababababab"


def points(drops: list[float], channels: int = 8) -> list[dict]:
    return [{"k": k, "fraction": k / channels, "accuracy": 90.0 - d, "accuracy_drop": d}
            for k, d in zip((1, 2, 4, 8), drops)]


def test_trial_summary_describes_the_layer_not_its_last_k():
    s = trial_summary(points([0.2, 0.9, 3.0, 80.0]))
    assert (s["safe_k_1pt"], s["safe_k_5pt"], s["safe_fraction_1pt"], s["safe_fraction_5pt"]) == (2, 4, 0.25, 0.5)
    # trapezoids from (0, 0): 1/8 * 0.1 + 1/8 * 0.55 + 2/8 * 1.95 + 4/8 * 41.5
    assert s["drop_auc"] == pytest.approx(0.0125 + 0.06875 + 0.4875 + 20.75)
    assert {k: v for k, v in s.items() if k.startswith("accuracy_at_")} == {
        "accuracy_at_12p5pct": 89.8, "accuracy_at_25pct": 89.1, "accuracy_at_50pct": 87.0, "accuracy_at_100pct": 10.0}
    assert (s["points"], s["max_k"]) == (4, 8)
    assert "accuracy" not in s  # the last K's accuracy (near chance) is not the layer's summary


def test_trial_summary_when_even_the_smallest_k_hurts():
    s = trial_summary(points([6.0, 9.0])[::-1])  # any order
    assert (s["safe_k_1pt"], s["safe_k_5pt"], s["safe_fraction_5pt"]) == (0, 0, 0.0)


@pytest.mark.parametrize("fraction, label", [(0.125, "12p5pct"), (0.25, "25pct"), (1.0, "100pct"),
                                             (1 / 3, "33p33pct"), (0.0625, "6p25pct")])
def test_fraction_label(fraction, label):
    assert fraction_label(fraction) == label
