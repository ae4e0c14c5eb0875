"""The free baseline: Torch-Pruning's global pruning (`MetaPruner(..., global_pruning=True)`), one call that
allocates channels across the whole network without a sweep.

Its importance is Torch-Pruning's own that matches the plan criterion (`IMPORTANCES`); a criterion without one
(mean_activation, ...) has no global plan. It prunes every coupled group Torch-Pruning finds (conv output
channels; linear layers and the network's output layer are left alone), whatever `sweep.unit` is. Its one knob,
the global pruning ratio, is bisected until the budget is met, counted on the pruned model: the smallest ratio
whose model keeps at most the budget's MACs (or params), the first found scanning up from 0. For a latency budget
the same search runs on the pruned model's time measured on the plan's target.

The channels it removes come back as our removal ({conv name: base model channel indices}, each group named by
a plan unit's conv when it holds one), so the plan is saved, masked, fine-tuned and verified like every other;
`global_removal` checks that our removal rebuilds the model Torch-Pruning pruned, counted the same.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from model.capture import hooked
from model.tracing import eval_mode
from runner.engine.images import Images, to_device
from runner.errors import InputError
from runner.planning.correction import Corrected, Measured, accepts
from runner.planning.curves import Curve, Option
from runner.planning.removal import Counts, _losers, counts, pruned_copy
from runner.planning.solve import Plan

log = logging.getLogger(__name__)

# plan criterion -> Torch-Pruning's importance for it
IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1_norm": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2_norm": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
}
NEEDS_GRADIENTS = ("taylor",)
Gradients = Callable[[nn.Module], None]  # fills .grad of a model's parameters (for taylor)
Amount = Callable[[nn.Module], float]  # what a pruned model keeps of a budget's kind (here: ms on the target)


def skip_reason(criterion: str) -> str | None:
    """Why there is no global plan for this plan criterion (None when there is one)."""
    if criterion in IMPORTANCES:
        return None
    return (f"plan criterion {criterion} has no Torch-Pruning importance (global pruning needs one of "
            f"{', '.join(IMPORTANCES)})")


@dataclass(frozen=True)
class GlobalPlan:
    ratio: float  # Torch-Pruning's global pruning ratio that met the budget
    removal: dict[str, list[int]]  # conv name -> base model channels removed
    counted: Counts  # the pruned model's
    tries: int  # pruned models counted while bisecting the ratio
    kept: float  # what the pruned model keeps of the budget's kind: MACs, params, or measured ms


def quick_counts(model: nn.Module, image_size: int) -> Counts:
    """`removal.counts` without FlopCounterMode's overhead, for searches that count many candidate models:
    a conv's MACs are its output elements times (input channels / groups) x kernel area, a linear's its input
    times output features, read on the model as it is (its shapes, one forward for the output sizes). Tests hold
    it equal to `counts`; what a job reports is counted with `counts`."""
    total = [0]

    def add(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            total[0] += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total[0] += out[0].numel() * m.in_features

    _forward_zeros(model, image_size, add)
    return Counts(total[0], sum(p.numel() for p in model.parameters()))


def quick_counter(model: nn.Module, orders: Mapping[str, Sequence[int]], kind: str,
                  image_size: int) -> Callable[[Mapping[str, int]], float]:
    """`removal.counter` with `quick_counts`: a plan's physically pruned model, counted (memoised)."""
    from runner.planning.removal import removal_from

    seen: dict[tuple, float] = {}

    def kept(ks: Mapping[str, int]) -> float:
        key = tuple(sorted(ks.items()))
        if key not in seen:
            seen[key] = getattr(quick_counts(pruned_copy(model, removal_from(ks, orders), image_size),
                                             image_size), kind)
        return seen[key]

    return kept


def _ignored(model: nn.Module, image_size: int) -> list[nn.Module]:
    """What global pruning leaves alone: every linear layer, and the last conv or linear to run (the output)."""
    ran: list[nn.Module] = []
    _forward_zeros(model, image_size, lambda m, i, o: ran.append(m))
    return [m for m in model.modules() if isinstance(m, nn.Linear)] + ran[-1:]


def prune_globally(model: nn.Module, criterion: str, ratio: float, image_size: int,
                   gradients: Gradients | None = None, round_to: int | None = None) -> dict[str, list[int]]:
    """Prune `model` in place with Torch-Pruning's global pruning at `ratio`; returns what it removed as
    {name of a conv losing output channels: its base model channels} (the first such conv of each group)."""
    importance = IMPORTANCES[criterion]()
    model.eval()  # the pruner traces a forward: in train mode it would move BN statistics
    if criterion in NEEDS_GRADIENTS:
        if gradients is None:
            raise ValueError(f"criterion {criterion} needs gradients")
        model.zero_grad()
        gradients(model)
    example = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(model, example, importance, global_pruning=True, pruning_ratio=ratio,
                                      ignored_layers=_ignored(model, image_size), round_to=round_to)
    names = {m: n for n, m in model.named_modules()}
    removal: dict[str, list[int]] = {}
    for group in pruner.step(interactive=True):
        convs = [(names[m], idxs) for m, idxs in _losers(pruner.DG, group) if isinstance(m, nn.Conv2d)]
        if convs:
            name, idxs = convs[0]
            removal[name] = sorted(idxs)
        group.prune()
    model.zero_grad(set_to_none=True)
    return removal


def renamed(model: nn.Module, removal: Mapping[str, Sequence[int]], units: Sequence[str],
            image_size: int) -> dict[str, list[int]]:
    """The same removal with each group named by the plan unit whose conv it holds (indices mapped to that
    conv's output channels), so its K reads against that unit's curve; other groups keep their names."""
    from runner.planning.removal import dependency_graph, tp_group

    wanted = set(units)
    dg = dependency_graph(model, image_size)
    names = {m: n for n, m in model.named_modules()}
    out: dict[str, list[int]] = {}
    for conv, idxs in removal.items():
        group = tp_group(dg, model.get_submodule(conv), idxs)
        holders = [(names[m], i) for m, i in _losers(dg, group) if isinstance(m, nn.Conv2d) and names[m] in wanted]
        name, local = holders[0] if holders else (conv, list(idxs))
        out[name] = sorted(int(i) for i in local)
    return out


def fit_global(base: nn.Module, criterion: str, kind: str, keep: float, image_size: int,
               gradients: Gradients | None = None, units: Sequence[str] = (), tolerance: float = 1e-4,
               max_tries: int = 30, amount: Amount | None = None, base_amount: float | None = None
               ) -> GlobalPlan | None:
    """The smallest global pruning ratio whose pruned model keeps at most `keep` of the base model's MACs or
    params (found on a scan in steps of 0.1, then bisected, each ratio counted on its pruned model); None when no
    ratio up to 0.9 meets the budget. With `amount` (a latency budget: a pruned model's time on the target, in
    the unit of `base_amount`) each ratio is measured instead of counted, to a tolerance of at least 0.01 and
    at most 16 pruned models: a median time is noisy, and each measurement costs a timing."""
    measured = amount is not None
    if measured:
        assert base_amount is not None, "a measured amount needs the base model's"
        tolerance, max_tries = max(tolerance, 0.01), min(max_tries, 16)
    else:
        base_amount = getattr(quick_counts(base, image_size), kind)
    target = keep * base_amount
    tried: dict[float, tuple[dict[str, list[int]], Counts, float]] = {}

    def attempt(ratio: float) -> float:
        if ratio not in tried:
            model = copy.deepcopy(base)
            removal = prune_globally(model, criterion, ratio, image_size, gradients)
            counted = quick_counts(model, image_size)
            tried[ratio] = (removal, counted, amount(model) if measured else getattr(counted, kind))
        return tried[ratio][2]

    # pruning more channels does not always shrink the model: a group whose every channel falls under the global
    # threshold is skipped whole by Torch-Pruning, so the first ratio that fits is found on a coarse scan upward
    # and then bisected against the one below it
    low, high = 0.0, None
    for step in range(1, 10):
        if attempt(step / 10) <= target:
            high = step / 10
            break
        low = step / 10
    if high is None:
        return None
    while high - low > tolerance and len(tried) < max_tries:
        mid = (low + high) / 2
        if attempt(mid) <= target:
            high = mid
        else:
            low = mid
    removal, counted, kept = tried[high]
    removal = renamed(base, removal, units, image_size) if units else removal
    check = counts(pruned_copy(base, removal, image_size), image_size)
    if check != counted:
        raise RuntimeError(f"the removal read back from Torch-Pruning's global pruning counts {check}, its model "
                           f"{counted} (quick_counts)")
    return GlobalPlan(high, removal, counted, len(tried), kept)


def as_plan(g: GlobalPlan, curves: Sequence[Curve], kind: str, required: float) -> Plan:
    """The global plan as a Plan over the units it prunes that have curves: K per unit and the curves' predicted
    drop there (the curves rank channels by our criterion, global pruning by Torch-Pruning's importance, so the
    prediction is the curves' reading of its K, not of its channels; a K beyond the measured range reads the
    largest measured K's drop, marked interpolated)."""
    by_unit = {c.unit: c for c in curves}
    choice: dict[str, Option] = {}
    for unit, idxs in g.removal.items():
        c = by_unit.get(unit)
        if c is None or not idxs:
            continue
        k = len(idxs)
        if k <= c.kmax:
            choice[unit] = c.at(k)
        else:
            last = c.points[-1]
            choice[unit] = Option(k, last.drop, last.macs, last.params, False)
    return Plan("global", kind, required, choice, float(g.kept))


def global_choice(base: nn.Module, criterion: str, kind: str, keep: float, image_size: int,
                  curves: Sequence[Curve], units: Sequence[str], base_total: float,
                  measure: Callable[[Mapping[str, Sequence[int]]], Measured],
                  gradients: Gradients | None = None, amount: Amount | None = None
                  ) -> tuple[Plan, Corrected, dict[str, list[int]]] | None:
    """The global plan of one budget as the prune job takes every plan: the plan, its combined measurement (no
    correction: the baseline stands as Torch-Pruning makes it) and its removal; None when out of reach. `amount`
    (with `base_total` in its unit) fits the ratio on a measurement, for latency budgets."""
    g = fit_global(base, criterion, kind, keep, image_size, gradients, units, amount=amount,
                   base_amount=base_total if amount is not None else None)
    if g is None:
        log.warning("global: no pruning ratio keeps at most %s of the %s", f"{keep:g}", kind)
        return None
    plan = as_plan(g, curves, kind, base_total * (1 - keep))
    m = measure(g.removal)
    log.info("global: ratio %.4f (%d pruned models %s), %s kept %.3f", g.ratio, g.tries,
             "timed" if amount is not None else "counted", kind, g.kept / base_total)
    return plan, Corrected(plan, m, accepts(plan, m), (), m, 1, plan), g.removal


def plan_methods(methods: Sequence[str], named: bool, criterion: str) -> tuple[list[str], dict[str, str]]:
    """The methods a prune job runs, and those skipped with why: `global` needs a Torch-Pruning importance for
    the plan criterion; named in the grid without one it is an error (`named`: plan.methods was written)."""
    why = skip_reason(criterion)
    if "global" not in methods or why is None:
        return list(methods), {}
    if named:
        raise InputError("plan.methods", "global", why, "plan.criterion one of " + ", ".join(IMPORTANCES)
                         + " with global", "remove global from plan.methods, or plan with one of those criteria")
    return [m for m in methods if m != "global"], {"global": why}


def calibration_gradients(images: Images, mean: Sequence[float], std: Sequence[float], batch_size: int) -> Gradients:
    """Gradients for GroupTaylorImportance: the summed cross-entropy of the calibration hold-out images, backward
    once per batch in eval mode (BN statistics untouched), on the model's device in float32."""
    def fill(model: nn.Module) -> None:
        device = next(model.parameters()).device
        x = to_device(images.images, mean, std, device, torch.float32, channels_last=False)
        y = torch.from_numpy(images.labels).to(device)
        with eval_mode(model), torch.enable_grad():
            for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
                nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()

    return fill


def _forward_zeros(model: nn.Module, image_size: int, hook: Callable) -> None:
    """One forward of a zero image with `hook` after every conv and linear layer (removed on exit)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with hooked([(m, hook, False) for m in layers]), eval_mode(model), torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
