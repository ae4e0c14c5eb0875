"""Plots stay readable however many layers and K values a sweep has (runner.outputs.figures)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from PIL import Image

from model.layers import list_convs
from model.resnet import build
from runner.outputs import figures

LAYERS = [c.name for c in list_convs(build("resnet18", 0.125, 10))]  # forward order, shortcuts included


def test_stages_put_the_stem_with_the_first_stage():
    got = figures.stages(LAYERS)
    assert [len(g) for g in got] == [5, 5, 5, 5]
    assert got[0][:2] == ["conv1", "layer1.0.conv1"] and got[3][-1] == "layer4.1.conv2"
    assert figures.stages(["layer2.0.conv1"]) == [["layer2.0.conv1"]]


def rows(layers: list[str], ks: int) -> list[dict]:
    return [{"layer": layer, "criterion": c, "k": k, "fraction": k / ks, "accuracy": 90 - k - i,
             "accuracy_drop": k + i} for i, layer in enumerate(layers) for c in ("l1_norm", "random")
            for k in range(1, ks + 1)]


@pytest.mark.parametrize("layers, ks, panels", [(LAYERS[:3], 4, 1), (LAYERS, 64, 4)])
def test_accuracy_plot_facets_by_stage_when_a_legend_would_be_too_long(tmp_path, monkeypatch, layers, ks,
                                                                      panels):
    seen = {}
    real = figures._save

    def spy(fig, path, dpi=100):
        seen["rows"] = len({ax.get_subplotspec().rowspan.start for ax in fig.axes})
        seen["legend"] = max(len(ax.get_legend().get_texts()) for ax in fig.axes if ax.get_legend())
        real(fig, path, dpi)

    monkeypatch.setattr(figures, "_save", spy)
    figures.accuracy_vs_k(rows(layers, ks), 90.0, tmp_path / "a.png")
    assert seen["rows"] == panels and seen["legend"] <= 5
    assert plt.get_fignums() == []  # closed


@pytest.mark.parametrize("ks", [4, 64, 512])
def test_heatmap_width_does_not_grow_with_k(tmp_path, ks):
    figures.sensitivity_heatmap(rows(LAYERS, ks), tmp_path / "h.png")
    with Image.open(tmp_path / "h.png") as image:
        assert image.size[0] < 1300 and image.size[1] < 700
