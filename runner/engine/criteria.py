"""Channel-ranking criteria (DESIGN §6) and the one calibration pass that ranks every (layer, criterion).

A criterion scores every channel of the pruned dimension (output channels for `target: output`, input
channels for `target: input`); the K lowest scores are pruned, ties broken by channel index. Data criteria
read statistics of the activation at the mask point (the layer's BN output, or the conv's input), all
gathered in ONE pass over the calibration images: one forward, plus one backward when `taylor` is asked.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.capture import watch
from model.graph import ConvSite
from model.groups import Group


@dataclass(frozen=True)
class View:
    """What a criterion may look at for one layer."""

    conv: ConvSite
    target: str
    modules: dict[str, nn.Module]
    stats: dict[str, Tensor]  # the statistics this criterion asked for, per channel of the pruned dimension
    seed: int

    @property
    def weight(self) -> Tensor:
        return self.modules[self.conv.name].weight.detach()


@dataclass(frozen=True)
class Criterion:
    name: str
    score: Callable[[View], Tensor]
    stat: str | None  # the calibration statistic it needs (None: weights only)
    targets: tuple[str, ...] = ("output", "input")
    help: str = ""

    def problem(self, conv: ConvSite, target: str) -> str | None:
        """Why this criterion cannot rank `conv` for `target`, or None when it can."""
        if target not in self.targets:
            return f"criterion {self.name} works only with target {' or '.join(self.targets)}"
        if self.name == "bn_scale" and not conv.bn:
            return f"criterion bn_scale needs a BatchNorm after the conv; {conv.name} has none"
        if self.name == "seed" and conv.in_channels != conv.out_channels:
            return (f"criterion seed ranks output channels and zeroes input channels, so it needs in == out "
                    f"channels; {conv.name} has {conv.in_channels} in, {conv.out_channels} out")
        return None


def _l1(v: View) -> Tensor:
    dims = (1, 2, 3) if v.target == "output" else (0, 2, 3)
    return v.weight.abs().sum(dims)


def _random(v: View) -> Tensor:
    channels = v.conv.out_channels if v.target == "output" else v.conv.in_channels
    gen = torch.Generator().manual_seed(v.seed * 1_000_003 + zlib.crc32(v.conv.name.encode()))
    return torch.rand(channels, generator=gen)


CRITERIA: dict[str, Criterion] = {c.name: c for c in [
    Criterion("mean_activation", lambda v: v.stats["mean"], "mean",
              help="signed mean of the activation over images, height and width"),
    Criterion("mean_abs_activation", lambda v: v.stats["abs_mean"], "abs_mean",
              help="mean absolute activation"),
    Criterion("l1_norm", _l1, None, help="L1 norm of the channel's weights (Li et al. 2017)"),
    Criterion("bn_scale", lambda v: v.modules[v.conv.bn].weight.detach().abs(), None, ("output",),
              help="|gamma| of the BN after the conv (Liu et al. 2017)"),
    Criterion("taylor", lambda v: v.stats["taylor"], "taylor",
              help="first-order Taylor |a * dL/da|, per image, averaged (Molchanov et al. 2017)"),
    Criterion("random", _random, None, help="a random order, seeded per layer"),
    Criterion("seed", lambda v: v.stats["seed"], "seed", ("input",),
              help="the report's procedure: rank output channels by the conv's mean output, zero input channels"),
]}


@dataclass(frozen=True)
class Ranking:
    layer: str
    criterion: str
    target: str
    scores: tuple[float, ...]
    order: tuple[int, ...]  # channel indices, lowest score first: prune order[:K]


def ranking_of(conv: ConvSite, criterion: str, target: str, scores: Tensor) -> Ranking:
    scores = scores.detach().double().cpu()
    order = torch.argsort(scores, stable=True)  # stable: ties keep channel order
    return Ranking(conv.name, criterion, target, tuple(scores.tolist()), tuple(order.tolist()))


class _Stats:
    """Per-channel sums gathered during the calibration pass, for one layer."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count: dict[str, int] = {}

    def add(self, name: str, value: Tensor, count: int) -> None:
        value = value.detach().double()
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count[name] = self.count.get(name, 0) + count

    def means(self) -> dict[str, Tensor]:
        return {k: (v / self.count[k]).cpu() for k, v in self.sums.items()}


def _watchers(convs: list[ConvSite], target: str, needs: dict[str, set[str]], stats: dict[str, _Stats]
              ) -> dict[str, Callable]:
    """Forward watchers that fold each layer's activations into its statistics as batches go by."""
    watchers: dict[str, Callable] = {}
    for conv in convs:
        want, st = needs.get(conv.name, set()), stats[conv.name]
        at_mask = want & {"mean", "abs_mean", "taylor"}
        if at_mask:
            module = (conv.bn or conv.name) if target == "output" else conv.name
            watchers[module] = _mask_point_watcher(st, at_mask, target)
        if "seed" in want:  # the report: per-batch mean of the conv's raw output, averaged over batches
            watchers.setdefault(conv.name, lambda i, o: None)
            first = watchers[conv.name]

            def seed_stat(i: Tensor, o: Tensor, st: _Stats = st, first: Callable = first) -> None:
                first(i, o)
                st.add("seed", o.detach().float().mean((0, 2, 3)), 1)

            watchers[conv.name] = seed_stat
    return watchers


def _mask_point_watcher(st: _Stats, want: set[str], target: str) -> Callable:
    def fold(inp: Tensor, out: Tensor) -> None:
        a = out if target == "output" else inp
        per_image = a.shape[2] * a.shape[3]
        with torch.no_grad():
            af = a.detach().float()
            if "mean" in want:
                st.add("mean", af.sum((0, 2, 3)), a.shape[0] * per_image)
            if "abs_mean" in want:
                st.add("abs_mean", af.abs().sum((0, 2, 3)), a.shape[0] * per_image)
        if "taylor" in want and a.requires_grad:
            def on_grad(g: Tensor) -> None:
                contrib = (a.detach().float() * g.float()).mean((2, 3)).abs().sum(0)
                st.add("taylor", contrib, a.shape[0])
            a.register_hook(on_grad)

    return fold


def rank_all(model: nn.Module, convs: list[ConvSite], criteria: list[str], target: str,
             images: Tensor, labels: Tensor, batch_size: int, seed: int) -> dict[tuple[str, str], Ranking]:
    """Rankings for every (layer, criterion) from one pass over the calibration images."""
    needs = {c.name: {CRITERIA[k].stat for k in criteria if CRITERIA[k].stat} for c in convs}
    stats = {c.name: _Stats() for c in convs}
    backward = any("taylor" in n for n in needs.values())
    if any(needs.values()):
        model.eval()
        with watch(model, _watchers(convs, target, needs, stats)):
            for x, y in zip(images.split(batch_size), labels.split(batch_size)):
                with torch.enable_grad() if backward else torch.inference_mode():
                    x = x.detach().requires_grad_(True) if backward else x  # the stem's input-target taylor
                    logits = model(x)
                    if backward:  # sum: each image's gradient is its own dL/da
                        model.zero_grad(set_to_none=True)
                        F.cross_entropy(logits.float(), y, reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    modules = dict(model.named_modules())
    rankings = {}
    for conv in convs:
        means = stats[conv.name].means()
        for name in criteria:
            view = View(conv, target, modules, means, seed)
            rankings[(conv.name, name)] = ranking_of(conv, name, target, CRITERIA[name].score(view))
    return rankings


def group_rankings(groups: Sequence[Group], rankings: dict[tuple[str, str], Ranking]) -> dict[tuple[str, str], Ranking]:
    """A group's ranking per criterion from its member convs' own (output-channel) rankings: each member's
    scores are divided by their mean absolute value (members of any scale weigh the same), then a group
    channel's score is the mean over the member conv channels that hold it."""
    out = {}
    criteria = sorted({c for _, c in rankings}, key=list(dict.fromkeys(c for _, c in rankings)).index)
    for group in groups:
        members = [m for m in group.members if m.kind == "conv" and m.dim == "out"]
        for criterion in criteria:
            total = torch.zeros(group.channels, dtype=torch.float64)
            count = torch.zeros(group.channels, dtype=torch.float64)
            for m in members:
                scores = torch.tensor(rankings[(m.name, criterion)].scores, dtype=torch.float64)
                scores = scores / scores.abs().mean().clamp_min(1e-30)
                total.index_add_(0, torch.tensor(m.root), scores[list(m.idxs)])
                count.index_add_(0, torch.tensor(m.root), torch.ones(len(m.root), dtype=torch.float64))
            scores = total / count.clamp_min(1)
            order = torch.argsort(scores, stable=True)
            out[(group.name, criterion)] = Ranking(group.name, criterion, "output", tuple(scores.tolist()),
                                                   tuple(order.tolist()))
    return out
