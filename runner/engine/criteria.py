"""Channel-ranking criteria (docs/numbers.md#criteria-and-targets) and the one calibration pass that ranks every (layer, criterion).

A criterion scores every channel of the pruned dimension (output channels for `target: output`, input
channels for `target: input`); the K lowest scores are pruned, ties broken by channel index. Data criteria
read statistics of the activation at the mask point (the layer's BN output, or the conv's input), all
gathered in ONE pass over the calibration images: one forward, plus one backward when `taylor` is asked.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.capture import hooked, watch
from model.convs import ConvSite
from model.groups import Group


@dataclass(frozen=True)
class View:
    """What a criterion may look at for one layer."""

    conv: ConvSite
    target: str
    modules: dict[str, nn.Module]
    stats: dict[str, Tensor]  # the statistics this criterion asked for, per channel of the pruned dimension
    seed: int  # random: this draw's seed (`draw_seed`)

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
    draws: bool = False  # a random order: drawn `repeats` times, each its own seed

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


def draw_seed(random_seed: int, repeat: int, layer: str) -> int:
    """The seed of one random order: a hash of the sweep's random_seed, the repeat and the layer (64 bits), so
    that draws differ between repeats and layers and nothing else (not the grid's `seed`) moves them."""
    digest = hashlib.sha256(f"random/{random_seed}/{repeat}/{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _random(v: View) -> Tensor:
    channels = v.conv.out_channels if v.target == "output" else v.conv.in_channels
    return torch.rand(channels, generator=torch.Generator().manual_seed(v.seed), dtype=torch.float64)


CRITERIA: dict[str, Criterion] = {c.name: c for c in [
    Criterion("mean_activation", lambda v: v.stats["mean"], "mean",
              help="signed mean of the activation over images, height and width (at the output target: BN's "
                   "output before ReLU and the residual sum, so mostly BN's beta)"),
    Criterion("mean_abs_activation", lambda v: v.stats["abs_mean"], "abs_mean",
              help="mean absolute activation"),
    Criterion("l1_norm", _l1, None, help="L1 norm of the channel's weights (Li et al. 2017)"),
    Criterion("bn_scale", lambda v: v.modules[v.conv.bn].weight.detach().abs(), None, ("output",),
              help="|gamma| of the BN after the conv (Liu et al. 2017)"),
    Criterion("taylor", lambda v: v.stats["taylor"], "taylor",
              help="first-order Taylor |a * dL/da|, per image, averaged (Molchanov et al. 2017)"),
    Criterion("random", _random, None, help="random orders, drawn sweep.random_repeats times, seeded per layer "
              "and repeat from sweep.random_seed", draws=True),
    Criterion("seed", lambda v: v.stats["seed"], "seed", ("input",),
              help="the report's procedure: rank output channels by the conv's mean output, zero input channels"),
]}


@dataclass(frozen=True)
class Ranking:
    """The channel orders of one (layer, criterion): one, or one per repeat for a criterion that draws."""

    layer: str
    criterion: str
    target: str
    all_scores: tuple[tuple[float, ...], ...]  # per repeat, per channel
    orders: tuple[tuple[int, ...], ...]  # per repeat: channel indices, lowest score first; prune order[:K]
    seeds: tuple[int, ...] = ()  # per repeat, for a criterion that draws

    @property
    def repeats(self) -> int:
        return len(self.orders)

    @property
    def order(self) -> tuple[int, ...]:
        """The order, for a criterion with one."""
        if self.repeats != 1:
            raise ValueError(f"{self.layer}/{self.criterion} has {self.repeats} orders; pick one of .orders")
        return self.orders[0]

    @property
    def scores(self) -> tuple[float, ...]:
        if self.repeats != 1:
            raise ValueError(f"{self.layer}/{self.criterion} has {self.repeats} score lists; pick one of .all_scores")
        return self.all_scores[0]


def order_of(scores: Tensor) -> tuple[int, ...]:
    """Lowest score first; ties keep channel order (a stable sort)."""
    return tuple(torch.argsort(scores.detach().double().cpu(), stable=True).tolist())


def ranking_of(conv: ConvSite, criterion: str, target: str, scores: list[Tensor], seeds: tuple[int, ...] = ()
               ) -> Ranking:
    return Ranking(conv.name, criterion, target, tuple(tuple(s.detach().double().cpu().tolist()) for s in scores),
                   tuple(order_of(s) for s in scores), seeds)


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


@contextmanager
def _own_inputs(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Inside the block, each named conv reads a clone of its input. A block's conv1 and its shortcut read the
    same tensor, so dL/dx of that tensor sums the gradient through both branches; the gradient of the clone is
    the gradient through this conv alone, which is what input-target Taylor needs."""
    def clone(module: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0]
        return (x.clone() if x.requires_grad else x.detach().clone().requires_grad_(torch.is_grad_enabled()),
                *inputs[1:])

    modules = dict(model.named_modules())
    with hooked([(modules[name], clone, True) for name in names]):
        yield


def rank_all(model: nn.Module, convs: list[ConvSite], criteria: list[str], target: str,
             images: Tensor, labels: Tensor, batch_size: int, random_seed: int, repeats: int = 1
             ) -> dict[tuple[str, str], Ranking]:
    """Rankings for every (layer, criterion) from one pass over the calibration images; a criterion that draws
    (random) gets `repeats` orders, seeded from `random_seed`."""
    needs = {c.name: {CRITERIA[k].stat for k in criteria if CRITERIA[k].stat} for c in convs}
    stats = {c.name: _Stats() for c in convs}
    backward = any("taylor" in n for n in needs.values())
    cloned = [c.name for c in convs if target == "input" and "taylor" in needs[c.name]]
    if any(needs.values()):
        model.eval()
        # the clones' pre-hooks run before the watchers' forward hooks, which then see the clone as the input
        with watch(model, _watchers(convs, target, needs, stats)), _own_inputs(model, cloned):
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
            crit = CRITERIA[name]
            seeds = tuple(draw_seed(random_seed, r, conv.name) for r in range(repeats)) if crit.draws else (0,)
            scores = [crit.score(View(conv, target, modules, means, s)) for s in seeds]
            rankings[(conv.name, name)] = ranking_of(conv, name, target, scores, seeds if crit.draws else ())
    return rankings


def group_rankings(groups: Sequence[Group], rankings: dict[tuple[str, str], Ranking]) -> dict[tuple[str, str], Ranking]:
    """A group's ranking per criterion from its member convs' own (output-channel) rankings: each member's
    scores are divided by their mean absolute value (members of any scale weigh the same), then a group
    channel's score is the mean over the member conv channels that hold it; for a criterion that draws, per
    repeat (repeat r of the group from repeat r of every member)."""
    out = {}
    criteria = sorted({c for _, c in rankings}, key=list(dict.fromkeys(c for _, c in rankings)).index)
    for group in groups:
        members = [m for m in group.members if m.kind == "conv" and m.dim == "out"]
        for criterion in criteria:
            first = rankings[(members[0].name, criterion)]
            all_scores = []
            for r in range(first.repeats):
                total = torch.zeros(group.channels, dtype=torch.float64)
                count = torch.zeros(group.channels, dtype=torch.float64)
                for m in members:
                    scores = torch.tensor(rankings[(m.name, criterion)].all_scores[r], dtype=torch.float64)
                    scores = scores / scores.abs().mean().clamp_min(1e-30)
                    total.index_add_(0, torch.tensor(m.root), scores[list(m.idxs)])
                    count.index_add_(0, torch.tensor(m.root), torch.ones(len(m.root), dtype=torch.float64))
                all_scores.append(total / count.clamp_min(1))
            out[(group.name, criterion)] = Ranking(
                group.name, criterion, "output", tuple(tuple(s.tolist()) for s in all_scores),
                tuple(order_of(s) for s in all_scores), first.seeds)
    return out
