"""An exact cached cut of any traceable CNN at mask points.

`Cut` splits the traced graph (`model.tracing`) at one or more mask points (`model.mask`): the nodes downstream
of a mask point are the suffix; every value the suffix reads that is not downstream, plus the values at the mask
points, is the cache; the prefix computes only those. Prefix and suffix are generated Python code
(GraphModules), not interpreted node by node. `Cut.full` is the plain masked forward of the eager model, to
compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from model.convs import ConvSite, _module_calls, _only_once
from model.mask import TARGETS, MaskPoint, apply_mask, local_keep, masked_points
from model.tracing import _reinplace, trace

# Ops that turn the last feature map into a vector for the classifier, and the pools that may come just before.
_TO_VECTOR_FUNCTIONS = {torch.flatten, torch.squeeze, torch.mean, torch.amax, torch.reshape}
_TO_VECTOR_METHODS = {"flatten", "view", "reshape", "squeeze", "mean", "amax"}
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d}
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class Tail:
    """What the suffix returns for one batch."""

    logits: Tensor
    layer: Tensor  # the pruned layer's output after masking (input target: the conv's BN output, or the conv's)
    final: Tensor  # the last 4-D feature map the classifier reads (see `final_node`)


class Cut:
    """The network cut at the mask points of a conv (`target` output or input) or of a group of channels.

    `unit` is a ConvSite, or any object with `mask_points` (a sequence of MaskPoint, the first one being the
    unit's own layer) such as `model.groups.Group` (target output only). The mask given to `suffix` is a keep
    vector over the unit's channels.
    """

    def __init__(self, model: nn.Module, unit: Any, target: str = "output") -> None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.unit, self.target = unit, target
        self.gm = trace(model)
        self.model = getattr(self.gm, "eager", model)  # the eager model, for `full`
        if isinstance(unit, ConvSite):
            self.points: tuple[MaskPoint, ...] = (unit.mask_point(target),)
            layer_module = (unit.bn or unit.name) if target == "input" else None
        else:
            if target != "output":
                raise ValueError(f"a group is masked at its members' outputs; target must be 'output', got {target!r}")
            self.points, layer_module = tuple(unit.mask_points), None
        self._plan = _plan(self.gm, self.points, layer_module)
        self._prefix = _prefix_module(self.gm, self._plan)
        self._suffix = _suffix_module(self.gm, self._plan, masked=True)
        self._plain: fx.GraphModule | None = None  # the unmasked suffix, built on first use

    @property
    def downstream(self) -> frozenset:
        """The graph nodes the mask reaches (the suffix's nodes, before the output)."""
        return self._plan.downstream

    @property
    def cached(self) -> tuple[str, ...]:
        """Names of the graph values that make up the cache, in graph order."""
        return tuple(n.name for n in self._plan.cached)

    def prefix(self, x: Tensor) -> tuple[Any, ...]:
        """The values computed before the mask points that are read at or after them."""
        return self._prefix(x)

    def suffix(self, cache: Sequence[Any], mask: Tensor | None) -> Tail:
        """Multiply the keep mask in at the mask points (None = no pruning) and run everything after them."""
        if mask is None:
            if self._plain is None:
                self._plain = _suffix_module(self.gm, self._plan, masked=False)
            logits, layer, final = self._plain(*cache)
        else:
            logits, layer, final = self._suffix(*cache, mask)
        return Tail(logits=logits, layer=layer, final=final)

    def full(self, x: Tensor, mask: Tensor | None) -> Any:
        """The eager model's plain forward with the mask applied by hooks (independent of the graph code)."""
        with masked_points(self.model, self.points, mask):
            return self.model(x)


@dataclass(frozen=True)
class _Plan:
    downstream: frozenset  # fx nodes of the suffix
    cached: tuple  # fx nodes whose values the prefix returns, in graph order
    points: tuple  # the MaskPoints
    masked: dict  # MaskPoint index -> (value node, reader node or None)
    outputs: tuple  # (logits arg, layer node or None = the first point's masked value, final node)


def _plan(gm: fx.GraphModule, points: Sequence[MaskPoint], layer_module: str | None) -> _Plan:
    calls = _module_calls(gm)
    downstream: set[fx.Node] = set()
    masked = {}
    for i, point in enumerate(points):
        _only_once(calls, point.module)
        node = calls[point.module][0]
        if point.input:
            masked[i] = (node.args[0], node)
            downstream |= {node} | _users_closure([node])
        else:
            masked[i] = (node, None)
            downstream |= _users_closure([node])
    out = next(n for n in gm.graph.nodes if n.op == "output")
    final = final_node(gm)
    layer = calls[layer_module][0] if layer_module else None
    reads: list[fx.Node] = [v for v, _ in masked.values()]
    for node in [*downstream, out]:
        reads += [a for a in node.all_input_nodes if a not in downstream]
    reads += [n for n in (final, layer) if n is not None and n not in downstream]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    cached = tuple(sorted({n for n in reads if n.op != "get_attr" and n not in downstream}, key=order.get))
    return _Plan(frozenset(downstream), cached, tuple(points), masked, (out.args[0], layer, final))


def _users_closure(starts: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        for user in stack.pop().users:
            if user not in seen and user.op != "output":
                seen.add(user)
                stack.append(user)
    return seen


def final_node(gm: fx.GraphModule) -> fx.Node:
    """The last 4-D feature map before the classifier.

    Walking back from the logits along each node's first input, the first op that turns a feature map into
    a vector (flatten, view, reshape, squeeze, mean, amax) reads it; when that op reads a pooling layer
    (adaptive or average pooling, module or function) the pool's input is taken instead: the feature map that
    enters the global pool."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    node = next(iter(out.all_input_nodes), None)
    while node is not None and node.op != "placeholder":
        if _to_vector(node):
            source = node.args[0]
            return source.args[0] if _is_pool(gm, source) else source
        node = next(iter(node.all_input_nodes), None)
    raise ValueError(f"cannot find the final feature map of {gm.__class__.__name__}: no flatten, view, reshape, "
                     "squeeze, mean or amax between the last feature map and the logits")


def _to_vector(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _TO_VECTOR_FUNCTIONS)
            or (node.op == "call_method" and node.target in _TO_VECTOR_METHODS)
            or (node.op == "call_module" and isinstance(node.graph.owning_module.get_submodule(node.target),
                                                         nn.Flatten)))


def _is_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _POOL_FUNCTIONS)
            or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), _POOL_MODULES)))


def _prefix_module(gm: fx.GraphModule, plan: _Plan) -> fx.GraphModule:
    """Code computing only the cached values."""
    needed: set[fx.Node] = set()
    stack = list(plan.cached)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack += node.all_input_nodes
    graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        if node in needed or node.op == "placeholder":
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[n] for n in plan.cached))
    _reinplace(graph)
    return fx.GraphModule(gm, graph, "Prefix")


def _suffix_module(gm: fx.GraphModule, plan: _Plan, masked: bool) -> fx.GraphModule:
    """Code that masks at the points and runs the downstream nodes: (cache..., mask) -> (logits, layer, final)."""
    graph, env = fx.Graph(), {}
    for i, node in enumerate(plan.cached):
        env[node] = graph.placeholder(f"cache_{i}_{node.name}")
    keep = graph.placeholder("mask") if masked else None
    for node in gm.graph.nodes:
        if node.op == "get_attr" and any(u in plan.downstream for u in node.users):
            env[node] = graph.node_copy(node)
    points = dict(plan.masked)
    by_value: dict[fx.Node, list[int]] = {}
    for i, (value, _) in points.items():
        by_value.setdefault(value, []).append(i)
    everyone: dict[fx.Node, fx.Node] = {}  # value -> its masked twin, read by every reader
    only: dict[tuple[fx.Node, fx.Node], fx.Node] = {}  # (value, reader) -> masked twin for that reader only

    def mask_value(value: fx.Node) -> None:
        for i in by_value.get(value, ()):
            if keep is None:
                continue
            point = plan.points[i]
            k = keep if point.local is None else graph.call_function(
                local_keep, (keep, point.channels, point.local, point.root))
            reader = points[i][1]
            if reader is None:
                everyone[value] = graph.call_function(apply_mask, (everyone.get(value, env[value]), k))
            else:
                only[(value, reader)] = graph.call_function(apply_mask, (env[value], k))

    for node in plan.cached:
        mask_value(node)

    def read(a: fx.Node, reader: fx.Node | None = None) -> fx.Node:
        if (a, reader) in only:
            return only[(a, reader)]
        return everyone[a] if a in everyone else env[a]

    for node in gm.graph.nodes:
        if node in plan.downstream:
            env[node] = graph.node_copy(node, lambda a, reader=node: read(a, reader))
            mask_value(node)
    logits_arg, layer, final = plan.outputs
    first_value = points[0][0]
    layer_value = env[layer] if layer is not None else read(first_value)
    graph.output((fx.node.map_arg(logits_arg, read), layer_value, read(final)))
    _reinplace(graph)
    return fx.GraphModule(gm, graph, "Suffix")
