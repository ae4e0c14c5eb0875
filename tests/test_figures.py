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


# ---- feature-map images, legible on W&B's image panel without zooming ----

def tile_sizes(image, c: int) -> list[int]:
    """Side lengths of the uniform tiles in the image's top-left grid cell row (tiles of distinct colours)."""
    import numpy as np

    row = image[2 + 1, :, :].astype(int)  # a pixel row through the first row of tiles (gap 2)
    changes = np.flatnonzero(np.any(row[1:] != row[:-1], axis=1)) + 1
    runs = np.diff(np.concatenate([[0], changes, [len(row)]]))
    return [int(r) for r in runs if r > 2]  # the tiles (gaps are 2 px)


@pytest.mark.parametrize("side", [1, 4, 8, 16, 32])
def test_tiles_are_upscaled_to_at_least_32_pixels(side):
    import numpy as np

    c = 16
    maps = np.arange(1, c + 1, dtype=np.float32)[:, None, None] * np.ones((c, side, side), np.float32)  # flat tiles
    image = figures.grid_image(maps, final=True)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    sizes = tile_sizes(image, c)
    assert sizes and all(s >= figures.MIN_TILE for s in sizes) and all(s == sizes[0] for s in sizes), sizes
    assert sizes[0] == side * -(-figures.MIN_TILE // side)  # nearest: a whole multiple of the map's side


def test_wrap_keeps_every_line_within_the_width():
    measure = len  # one unit per character
    text = "layer3.1.conv1, output pruning by mean_activation, K=16/64, accuracy 47.25%\nsecond line " + "x" * 30
    lines = figures.wrap(text, 20, measure)
    assert all(measure(line) <= 20 for line in lines), lines
    assert " ".join(lines).replace(" ", "") == text.replace("\n", "").replace(" ", "")  # nothing lost
    assert lines[:2] == ["layer3.1.conv1,", "output pruning by"]


def test_captioned_image_states_its_one_colour_scale_and_wraps_its_title():
    import numpy as np

    maps = np.random.default_rng(0).normal(size=(8, 4, 4)).astype(np.float32)
    short = figures.grid_image(maps, title="short")
    long = figures.grid_image(maps, title="word " * 200)
    assert short.shape[1] == long.shape[1] == figures.CAPTION_WIDTH  # the text wraps: the image does not widen
    assert long.shape[0] > short.shape[0] + 10 * figures.FONT_SIZE
    lo, hi = -float(np.abs(maps).max()), float(np.abs(maps).max())
    assert figures.scale_note("RdBu_r", lo, hi) == f"one colour scale for every tile: {lo:.3g} (blue) to {hi:.3g} " \
                                                   "(red), 0 = white"
    assert figures.scale_note("viridis", 0.0, 2.5) == "one colour scale for every tile: 0 (purple) to 2.5 (yellow)"


def test_grid_colours_are_the_colour_maps_floats_times_255_and_the_gaps_white():
    """The image looks colours up in the map's uint8 table; the same pixels as converting its float colours (the
    way the figures were first drawn), tile by tile, and in the caption's colour bar."""
    import numpy as np
    from matplotlib import colormaps

    values = np.array([-1.0, 0.0, 0.5, 1.0], np.float32)  # RdBu_r, symmetric: lo = -1, hi = 1
    maps = values[:, None, None] * np.ones((4, 2, 2), np.float32)
    image = figures.grid_image(maps)
    expected = (colormaps["RdBu_r"]((values + 1) / 2)[:, :3] * 255).astype(np.uint8)
    gap, tile = 2, 2 * figures.MIN_TILE // 2  # 2x2 layout of 32-pixel tiles, 2-pixel gaps
    for i, colour in enumerate(expected):
        r, c = divmod(i, 2)
        y, x = gap + r * (tile + gap), gap + c * (tile + gap)
        assert (image[y:y + tile, x:x + tile] == colour).all(), (i, image[y, x], colour)
    assert (image[:gap] == 255).all() and (image[:, :gap] == 255).all()
    captioned = figures.grid_image(maps, title="t")
    bar = captioned[image.shape[0] + 6, 10:figures.CAPTION_WIDTH - 10]
    ramp = (colormaps["RdBu_r"](np.linspace(0, 1, figures.CAPTION_WIDTH - 20))[:, :3] * 255).astype(np.uint8)
    assert np.array_equal(bar, ramp)
