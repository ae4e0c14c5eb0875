"""Pictures of results: feature-map grids (array ops, for every K) and matplotlib figures (for the report).

Nothing here computes results; it draws what the engine measured.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import numpy as np
from matplotlib import colormaps

from runner.outputs.results import TrialId, by_trial
from runner.storage import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot() -> Any:
    """matplotlib.pyplot, imported when a plot is drawn (or ahead, by a sweep's thread that waits for Ray): the
    feature-map images need only colour maps, and pyplot's import is slow."""
    import matplotlib.pyplot as plt

    return plt

MIN_TILE = 32  # pixels: every feature-map tile is upscaled (nearest) to at least this, to be legible unzoomed
CAPTION_WIDTH = 480  # pixels: the narrowest captioned image (its text wraps to this)
FONT_SIZE = 13  # pixels
CMAP_WORDS = {"RdBu_r": ("blue", "red"), "viridis": ("purple", "yellow")}  # colours at the low and high ends
FINAL_TILES = 64  # the final stage's channels pictured: the strongest by mean, as the seed's figure


def top_channels(maps: np.ndarray, count: int = FINAL_TILES) -> np.ndarray:
    """Indices of the `count` channels with the highest mean, highest first (the seed's figure)."""
    means = maps.reshape(len(maps), -1).mean(1)
    return np.argsort(-means, kind="stable")[:count]


def _layout(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def tiled(maps: np.ndarray, gap: int = 2) -> np.ndarray:
    """[C, H, W] maps -> one 2-D float canvas of tiles (each upscaled, nearest, to at least MIN_TILE pixels on its
    longer side), NaN between them."""
    maps = np.asarray(maps, dtype=np.float32)
    c, h, w = maps.shape
    scale = max(1, math.ceil(MIN_TILE / max(h, w)))
    tiles = maps.repeat(scale, 1).repeat(scale, 2)
    rows, cols = _layout(c)
    th, tw = h * scale, w * scale
    canvas = np.full((rows * (th + gap) + gap, cols * (tw + gap) + gap), np.nan, np.float32)
    for i in range(c):
        r, q = divmod(i, cols)
        y, x = gap + r * (th + gap), gap + q * (tw + gap)
        canvas[y:y + th, x:x + tw] = tiles[i]
    return canvas


def _limits(maps: np.ndarray, symmetric: bool) -> tuple[float, float]:
    if symmetric:
        m = float(np.abs(maps).max()) or 1.0
        return -m, m
    lo, hi = float(maps.min()), float(maps.max())
    return lo, (hi if hi > lo else lo + 1.0)


def _style(maps: np.ndarray, final: bool) -> tuple[np.ndarray, str, tuple[float, float]]:
    """What to draw and how: the pruned layer with a diverging scale centred on zero (a pruned channel is a
    flat white tile); the final stage as the seed drew it, its FINAL_TILES highest-mean channels on one scale."""
    if final:
        maps = maps[top_channels(maps)]
        return maps, "viridis", _limits(maps, False)
    return maps, "RdBu_r", _limits(maps, True)


@functools.lru_cache(maxsize=None)
def _colormap(name: str) -> Any:
    """A colour map, made once per name: matplotlib's registry hands out a fresh copy on every lookup, whose
    lookup table is then built again for every image."""
    return colormaps[name]


@functools.lru_cache(maxsize=16)
def _colour_bar(cmap: str, width: int) -> np.ndarray:
    """A caption's colour bar, one pixel high, as uint8 RGB: the same for every image of a colour map and width."""
    bar = np.ascontiguousarray(_colormap(cmap)(np.linspace(0, 1, width), bytes=True)[:, :3])
    bar.flags.writeable = False
    return bar


def grid_image(maps: np.ndarray, final: bool = False, title: str | None = None) -> np.ndarray:
    """A map grid as one uint8 RGB image, colour-mapped with array operations (cheap enough for every K).
    With a title, a caption and a colour bar with its limits are added below the grid."""
    maps, cmap, (lo, hi) = _style(np.asarray(maps, dtype=np.float32), final)
    canvas = tiled(maps)
    # bytes=True: the map's table as uint8 (its floats x 255, truncated), looked up directly: the same pixels as
    # converting the float colours, without the float image
    scaled = np.clip((np.nan_to_num(canvas) - lo) / (hi - lo), 0, 1)
    image = np.ascontiguousarray(_colormap(cmap)(scaled, bytes=True)[..., :3])
    image[np.isnan(canvas)] = 255  # white gaps between tiles
    return image if title is None else _captioned(image, title, cmap, lo, hi)


def scale_note(cmap: str, lo: float, hi: float) -> str:
    """The caption's statement of the image's one colour scale."""
    low, high = CMAP_WORDS.get(cmap, ("low", "high"))
    middle = ", 0 = white" if cmap == "RdBu_r" else ""
    return f"one colour scale for every tile: {lo:.3g} ({low}) to {hi:.3g} ({high}){middle}"


def _font(size: int = FONT_SIZE) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError):
        return ImageFont.load_default()


def wrap(text: str, width: int, measure: Callable[[str], float]) -> list[str]:
    """Lines of `text` (its own line breaks kept) that each measure at most `width` pixels, broken between
    words (a single word longer than the line is broken where it must)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if measure(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while measure(word) > width and len(word) > 1:
                cut = max([i for i in range(1, len(word)) if measure(word[:i]) <= width] or [1])
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


@functools.lru_cache(maxsize=4096)
def _text_width(text: str) -> float:
    """The caption font's width of `text` in pixels. Cached: every point's caption repeats most of the text of
    the one before, and measuring text is the bulk of a caption's cost."""
    from PIL import Image, ImageDraw

    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=_font())


def _captioned(image: np.ndarray, title: str, cmap: str, lo: float, hi: float) -> np.ndarray:
    """The grid with a colour bar (drawn as an array) labelled with its limits, a line stating the image's one
    colour scale, and the title wrapped to the image's width below it."""
    from PIL import Image, ImageDraw

    font = _font()
    width = max(image.shape[1], CAPTION_WIDTH)
    measure = _text_width
    lines = [scale_note(cmap, lo, hi)] + wrap(title, width - 20, measure)
    step = FONT_SIZE + 5
    bar_top = image.shape[0] + 6
    text_top = bar_top + 12 + step + 4
    out = np.full((text_top + step * len(lines) + 6, width, 3), 255, np.uint8)
    out[:image.shape[0], :image.shape[1]] = image
    out[bar_top:bar_top + 12, 10:width - 10] = _colour_bar(cmap, width - 20)[None]
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    ends = f"{lo:.3g}", f"{hi:.3g}"
    draw.text((10, bar_top + 14), ends[0], fill=(0, 0, 0), font=font)
    draw.text((width - 10 - measure(ends[1]), bar_top + 14), ends[1], fill=(0, 0, 0), font=font)
    for i, line in enumerate(lines):
        draw.text((10, text_top + step * i), line, fill=(0, 0, 0), font=font)
    return np.asarray(pil)


def _save(fig: Figure, path: Path, dpi: int = 100) -> None:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        pyplot().close(fig)


def png(image: np.ndarray) -> bytes:
    """An RGB uint8 image as a PNG file's bytes (8-bit RGB, not interlaced): every row unfiltered, the rows
    deflated at zlib level 1. Pillow's encoder tries every row filter, whatever the level; on the feature-map
    images (flat tiles, white space, text) no filter deflates smaller, and skipping the filters halves the
    encoding time (docs/benchmarks.md). Lossless: any decoder reads the same pixels."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"png: an RGB uint8 image is [height, width, 3] uint8, not {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    rows = np.zeros((height, 1 + 3 * width), np.uint8)  # each row: its filter type (0: none), then its pixels
    rows[:, 1:] = image.reshape(height, 3 * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB)
    return b"".join((b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header), _chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)),
                     _chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def save_png(image: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(png(image))


LEGEND_LINES = 8  # more layers than this in one panel: facet by stage, one row of panels each


def stages(layers: Sequence[str]) -> list[list[str]]:
    """Layers grouped by the stage they belong to (the first part of the name: conv1, layer1, ...), in order;
    a stage of one layer (the stem) joins the next one."""
    groups: dict[str, list[str]] = {}
    for layer in layers:
        groups.setdefault(layer.split(".")[0], []).append(layer)
    out: list[list[str]] = []
    carry: list[str] = []
    for group in groups.values():
        if len(group) == 1 and not out and len(groups) > 1:
            carry = group  # the stem, drawn with the first stage
            continue
        out.append(carry + group)
        carry = []
    return out or [carry]


def layer_caption(target: str) -> str:
    """The caption under a pruned layer's feature maps: only output pruning makes the pruned channels flat."""
    if target == "output":
        return "pruned layer's BN output, mean over eval images (pruned channels are flat white)"
    return "pruned layer's BN output, mean over eval images (its input channels were pruned: no channel is flat)"


def accuracy_vs_k(rows: Sequence[dict], baseline: float, path: Path, title: str | None = None) -> None:
    """Accuracy against K (as a fraction of the layer's channels, so layers of different widths share an
    axis): one column of panels per criterion, and, when there are more layers than a legend can hold, one row
    per stage, so that every panel keeps a short legend. A row with `drop_low` / `drop_high` gets a band: the
    accuracy interval its trial's baseline minus those ends gives. Each line starts at its trial's baseline."""
    criteria = sorted({r["criterion"] for r in rows})
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    trials = by_trial(rows)
    groups = [layers] if len(layers) <= LEGEND_LINES else stages(layers)
    fig, axes = pyplot().subplots(len(groups), len(criteria), figsize=(4.6 * len(criteria) + 1.6, 3.2 * len(groups)),
                             squeeze=False, sharex=True, sharey=True)
    cmap = colormaps["tab10"]
    for row, group in enumerate(groups):
        for col, criterion in enumerate(criteria):
            ax = axes[row][col]
            for i, layer in enumerate(group):
                pts = trials.get(TrialId(layer, criterion), [])
                if not pts:
                    continue
                start = pts[0].get("baseline_accuracy", baseline)
                xs = [0.0] + [r["fraction"] for r in pts]
                ax.plot(xs, [start] + [r["accuracy"] for r in pts], marker="." if len(pts) <= 16 else None,
                        lw=1.3, color=cmap(i % 10), label=layer)
                if all("drop_high" in r for r in pts):
                    base = [r.get("baseline_accuracy", baseline) for r in pts]
                    ax.fill_between(xs, [start] + [b - r["drop_high"] for b, r in zip(base, pts)],
                                    [start] + [b - r["drop_low"] for b, r in zip(base, pts)],
                                    color=cmap(i % 10), alpha=0.18, lw=0)
            ax.axhline(baseline, color="grey", lw=0.8, ls="--")
            ax.set_xlim(0, 1.02)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(criterion)
            if row == len(groups) - 1:
                ax.set_xlabel("K / channels pruned (band: 95% paired interval)")
            if col == 0:
                ax.set_ylabel("accuracy (%)")
        axes[row][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10, y=1.04)
    _save(fig, path)


def sensitivity_heatmap(rows: Sequence[dict], path: Path) -> None:
    """Accuracy drop by layer (rows) and K / channels (x), one panel per criterion (random: the mean over its
    draws). Each cell spans from the
    previous measured fraction to its own, so layers of 8 and of 512 channels fill the same width without gaps,
    and the figure's size does not grow with the number of K values."""
    criteria = sorted({r["criterion"] for r in rows})
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    trials = by_trial(rows)
    fig, axes = pyplot().subplots(1, len(criteria), figsize=(1.6 + 4.2 * len(criteria), 1.4 + 0.26 * len(layers)),
                             squeeze=False, sharey=True)
    vmax = max(1.0, max(r["accuracy_drop"] for r in rows))
    image = None
    for ax, criterion in zip(axes[0], criteria):
        for i, layer in enumerate(layers):
            pts = [(r["fraction"], r["accuracy_drop"]) for r in trials.get(TrialId(layer, criterion), [])]
            if not pts:
                continue
            edges = np.array([0.0] + [f for f, _ in pts])
            image = ax.pcolormesh(np.vstack([edges, edges]), np.array([[i - 0.5] * len(edges), [i + 0.5] *
                                  len(edges)]), np.array([[d for _, d in pts]]), cmap="magma_r", vmin=0, vmax=vmax)
        ax.set_title(criterion)
        ax.set_xlim(0, 1)
        ax.set_ylim(len(layers) - 0.5, -0.5)
        ax.set_yticks(range(len(layers)), labels=layers, fontsize=7)
        ax.set_xlabel("K / channels")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="accuracy drop (points)")
    _save(fig, path)


METHOD_STYLE = {"knapsack": ("tab:blue", "o"), "threshold": ("tab:orange", "s"), "uniform": ("tab:gray", "^"),
                "global": ("tab:green", "D")}


def plans_figure(table: Any, baseline: float, path: Path, x_column: str = "macs_kept",
                 x_label: str = "MACs kept (fraction of the base model, counted on the pruned model)") -> None:
    """Accuracy against MACs kept (or `x_column`: measured latency kept), one colour and marker per method:
    hollow before fine-tuning (channels removed), filled after, with the fine-tuned accuracy's 95% interval; the
    base model as a dashed line. `table` is plans.csv as a DataFrame."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for method, rows in table.groupby("method", sort=False):
        colour, marker = METHOD_STYLE.get(method, ("black", "x"))
        x = rows[x_column].to_numpy(float)
        ax.scatter(x, rows["accuracy_removed"], facecolors="none", edgecolors=colour, marker=marker, s=50,
                   label=f"{method}, removed (no fine-tuning)")
        tuned = rows["accuracy_finetuned"].to_numpy(float)
        if np.isfinite(tuned).any():
            err = np.vstack([tuned - rows["finetuned_low"].to_numpy(float),
                             rows["finetuned_high"].to_numpy(float) - tuned])
            ax.errorbar(x, tuned, yerr=err, fmt=marker, color=colour, capsize=3, label=f"{method}, fine-tuned")
            for xi, a, b in zip(x, rows["accuracy_removed"].to_numpy(float), tuned):
                ax.plot([xi, xi], [a, b], color=colour, lw=0.8, alpha=0.5)
    ax.axhline(baseline, color="black", ls="--", lw=1, label=f"base model {baseline:.2f}%")
    ax.set_xlabel(x_label)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Plans: accuracy vs {x_label.split(' (')[0]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)
