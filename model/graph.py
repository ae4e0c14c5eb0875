"""Any traceable CNN as a graph (torch.fx): its convs in execution order, and an exact cached cut at mask points.

`trace` turns the model into a GraphModule that shares the model's weights and has no in-place operations, so
that values kept from one call can be read by later calls unchanged. `list_convs` reads every conv off that
graph. `Cut` splits the graph at one or more mask points: the nodes downstream of a mask point
are the suffix; every value the suffix reads that is not downstream, plus the values at the mask points, is the
cache; the prefix computes only those. Prefix and suffix are generated Python code (GraphModules), not
interpreted node by node. `Cut.full` is the plain masked forward of the eager model, to compare against.
"""

from __future__ import annotations

import copy
import inspect
import operator
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

TARGETS = ("output", "input")

# In-place Python operators and their out-of-place versions.
_OUT_OF_PLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor, operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
    operator.imatmul: operator.matmul,
}
# Ops that turn the last feature map into a vector for the classifier, and the pools that may come just before.
_TO_VECTOR_FUNCTIONS = {torch.flatten, torch.squeeze, torch.mean, torch.amax, torch.reshape}
_TO_VECTOR_METHODS = {"flatten", "view", "reshape", "squeeze", "mean", "amax"}
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d}
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)
_VIEWS = {"getitem", "view", "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "permute", "narrow",
          "select", "expand", "as_strided", "t", "unflatten", "view_as", "expand_as", "diagonal", "movedim", "chunk",
          "split", "unbind", "swapaxes", "swapdims"}
_SAFE = "_prune_sweep_no_inplace"  # set on GraphModules made by `trace`


# --- the mask, shared by the eager hooks and the generated suffix (one expression, so the bits agree) ---------

def apply_mask(x: Tensor, keep: Tensor) -> Tensor:
    """Multiply channel c of an N x C x H x W tensor by keep[c] (1 keep, 0 prune)."""
    return x * keep.view(1, -1, 1, 1).to(x.dtype)


@dataclass(frozen=True)
class MaskPoint:
    """Where a mask is multiplied in: the output of `module` (seen by every reader), or with `input=True` the
    input of `module` (seen by that module only). A unit's keep vector maps to this point's channels through
    `local`/`root`: channel local[j] here takes keep[root[j]]; the others stay 1. None = the identity."""

    module: str
    input: bool = False
    channels: int = 0  # size of the masked dimension here (needed only with local/root)
    local: tuple[int, ...] | None = None
    root: tuple[int, ...] | None = None


def local_keep(keep: Tensor, channels: int, local: tuple[int, ...] | None, root: tuple[int, ...] | None) -> Tensor:
    """The keep vector at a mask point, from the unit's keep vector (see MaskPoint)."""
    if local is None:
        return keep
    out = keep.new_ones(channels)
    out[torch.tensor(local, device=keep.device)] = keep[torch.tensor(root, device=keep.device)]
    return out


def point_keep(keep: Tensor, point: MaskPoint) -> Tensor:
    return local_keep(keep, point.channels, point.local, point.root)


@contextmanager
def masked_points(model: nn.Module, points: Sequence[MaskPoint], keep: Tensor | None) -> Iterator[None]:
    """Inside the block, every forward of `model` multiplies `keep` in at each point (hooks removed on exit)."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for point in points if keep is not None else ():
            k = point_keep(keep, point)
            if point.input:
                def pre(module: nn.Module, args: tuple, k: Tensor = k) -> tuple:
                    return (apply_mask(args[0], k.to(args[0].device)), *args[1:])
                handles.append(modules[point.module].register_forward_pre_hook(pre))
            else:
                def post(module: nn.Module, args: tuple, out: Tensor, k: Tensor = k) -> Tensor:
                    return apply_mask(out, k.to(out.device))
                handles.append(modules[point.module].register_forward_hook(post))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- tracing --------------------------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    """symbolic_trace's tracer, remembering the innermost module whose forward was being traced on failure."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = next((n for n, mod in self.root.named_modules() if mod is m), type(m).__name__)
            raise


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block; every module's training flag restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def trace(model: nn.Module) -> fx.GraphModule:
    """The model as a GraphModule sharing its weights, traced in eval mode, with no in-place operations.

    Python branches on `self.training` take the eval path. Raises ValueError naming the module where tracing
    failed."""
    if getattr(model, _SAFE, False):
        return model
    tracer = _Tracer()
    try:
        with eval_mode(model):
            graph = tracer.trace(model)
    except Exception as err:
        where = f"module {tracer.failed_in!r} ({type(model.get_submodule(tracer.failed_in)).__name__})" \
            if tracer.failed_in else f"the forward of {type(model).__name__} itself"
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx: tracing failed in {where}: "
                         f"{type(err).__name__}: {err}") from err
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _out_of_place(gm)
    setattr(gm, _SAFE, True)
    object.__setattr__(gm, "eager", model)  # not registered as a submodule: the model `Cut.full` runs
    return gm


def _out_of_place(gm: fx.GraphModule) -> None:
    """Rewrite every in-place operation as its out-of-place version (the numbers do not change).

    An in-place op on value A is replaced by an op making a new value N; readers of A that come after it in
    the graph saw the mutated A, so they now read N. Modules with `inplace=True` are replaced in the
    GraphModule (never in the caller's model) by copies with `inplace=False`."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        mutated = _make_out_of_place(gm, node)
        if mutated is None:
            continue
        if _base_read_later(mutated, node, order):  # the write would reach a tensor read later through a view
            raise ValueError(f"cannot make {gm.__class__.__name__} safe for caching: {node.name!r} ({node.target}) "
                             f"writes in place into a view ({mutated.name!r}); write into a copy instead")
        for reader in list(mutated.users):
            if reader is not node and order.get(reader, -1) > order[node]:
                reader.replace_input_with(mutated, node)
    gm.graph.lint()
    gm.recompile()


def _is_view(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_function", "call_method") and name in _VIEWS


def _base_read_later(mutated: fx.Node, writer: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether `mutated` is a view whose base, or another view of that base, is read after `writer`: then
    the out-of-place version would leave that base unchanged where the eager model changed it."""
    if not _is_view(mutated):
        return False
    root = mutated
    while _is_view(root) and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    aliases, stack = set(), [root]
    while stack:
        node = stack.pop()
        aliases.add(node)
        stack += [u for u in node.users if _is_view(u) and u.args[0] is node and u not in aliases]
    return any(order.get(reader, -1) > order[writer] for alias in aliases - {mutated} for reader in alias.users)


def _make_out_of_place(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """Rewrite one node if it mutates its first argument; returns that argument (the mutated value).

    node.meta["in_place"] keeps how to undo the rewrite (`_reinplace`) where nothing else reads the value."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if getattr(module, "inplace", False) is True:
            original = "_in_place_" + node.target.replace(".", "_")
            gm.add_submodule(original, module)  # kept for `_reinplace`; the graph calls the copy
            _replace_submodule(gm, node, _without_inplace(module))
            node.meta["in_place"] = ("target", original)
            return first
    elif node.op == "call_function":
        twin = _OUT_OF_PLACE_OPERATORS.get(node.target) or _out_of_place_twin(node.target)
        if twin is not None:
            node.meta["in_place"] = ("target", node.target)
            node.target = twin
            return first
        if _set_inplace(node, False):
            node.meta["in_place"] = ("inplace", True)
            return first
    elif node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.startswith("_"):
            if callable(getattr(Tensor, name[:-1], None)):
                node.meta["in_place"] = ("target", name)
                node.target = name[:-1]
            else:  # no out-of-place twin (fill_, zero_): mutate a copy instead
                with gm.graph.inserting_before(node):
                    clone = gm.graph.call_method("clone", (first,))
                node.replace_input_with(first, clone)
            return first
    return None


def _reinplace(graph: fx.Graph) -> None:
    """Undo the out-of-place rewrite where the mutated value was made in this graph and nothing else reads it
    (not a later node, not the output, not through a view): the same ops, allocations and numbers as eager."""
    for node in graph.nodes:
        how = node.meta.get("in_place")
        source = node.args[0] if node.args else None
        if how is None or not isinstance(source, fx.Node) or source.op in ("placeholder", "get_attr") \
                or len(source.users) != 1 or _is_view(source):
            continue
        if how[0] == "target":
            node.target = how[1]
        else:
            _set_inplace(node, True)


def _out_of_place_twin(fn: Any) -> Any:
    """torch.relu_ -> torch.relu, torch._C._nn.hardswish_ -> torch._C._nn.hardswish; None if not in place."""
    name = getattr(fn, "__name__", "")
    if not name.endswith("_") or name.startswith("_"):
        return None
    home = sys.modules.get(getattr(fn, "__module__", None) or "")
    if home is None or getattr(home, name, None) is not fn:
        return None
    twin = getattr(home, name[:-1], None)
    return twin if callable(twin) else None


def _set_inplace(node: fx.Node, value: bool) -> bool:
    """Call F.relu(x, inplace=...) and the like with `inplace=value`; True when it was `not value` before."""
    try:
        signature = inspect.signature(node.target)
    except (TypeError, ValueError):
        return False
    if "inplace" not in signature.parameters:
        return False
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError:
        return False
    bound.apply_defaults()
    if bound.arguments["inplace"] is value:
        return False
    bound.arguments["inplace"] = value
    node.args, node.kwargs = tuple(bound.args), dict(bound.kwargs)
    return True


def _without_inplace(module: nn.Module) -> nn.Module:
    """A copy with inplace=False that shares parameters and buffers with the original."""
    twin = copy.copy(module)  # a new __dict__ holding the same parameter and buffer dicts
    for attr, value in module.__dict__.items():
        if "hooks" in attr and isinstance(value, dict):  # hooks stay with the caller's module
            twin.__dict__[attr] = type(value)()
    twin.inplace = False
    return twin


def _replace_submodule(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> None:
    parent_name, _, field = node.target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    if parent is gm or type(parent) is nn.Module:  # a container made by GraphModule: ours to edit
        setattr(parent, field, module)
    else:  # a module shared with the caller's model: install the copy under a new name instead
        name = "_out_of_place_" + node.target.replace(".", "_")
        gm.add_submodule(name, module)
        node.target = name


# --- the convs --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvSite:
    """One nn.Conv2d call of the traced graph, in execution order, with the BN that alone reads its output."""

    name: str  # module path
    bn: str | None  # the BatchNorm2d that directly and solely reads the conv's output
    index: int  # execution order among the convs
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    readers: tuple[str, ...]  # what reads the value at the output mask point (module paths or op names)
    input_readers: tuple[str, ...]  # what else reads the conv's input (unmasked by target: input)
    # the ungrouped conv that alone reads the output mask point, through activations only (a block's conv1 ->
    # its conv2): removing an output channel also removes that conv's input slice
    consumer: str | None = None
    # a side branch: a conv on the shorter of the two paths into a residual add (a projection shortcut such as
    # ResNet's downsample or RegNet's proj, whatever its name): the sweep leaves these out unless include_shortcuts
    side: bool = False

    @property
    def shortcut(self) -> bool:
        return self.side

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    def channels(self, target: str) -> int:
        """Size of the pruned dimension."""
        return self.out_channels if target == "output" else self.in_channels

    def mask_point(self, target: str) -> MaskPoint:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if target == "input":
            return MaskPoint(self.name, input=True)
        return MaskPoint(self.bn or self.name)


def list_convs(model: nn.Module, image_size: int) -> list[ConvSite]:
    """Every nn.Conv2d of the traced graph in execution order (grouped and depthwise included)."""
    gm = trace(model)
    calls = _module_calls(gm)
    shapes = _shapes(model, gm, image_size)
    side = side_convs(gm)
    sites: list[ConvSite] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Conv2d):
            continue
        _only_once(calls, node.target)
        conv: nn.Conv2d = gm.get_submodule(node.target)
        bn = _own_bn(gm, node, calls)
        at_point = calls[bn][0] if bn else node
        source = node.args[0]
        sites.append(ConvSite(
            name=node.target, bn=bn, index=len(sites), in_channels=conv.in_channels,
            out_channels=conv.out_channels, groups=conv.groups, kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride), in_hw=shapes[node.target][0], out_hw=shapes[node.target][1],
            readers=tuple(_describe(gm, u) for u in at_point.users),
            input_readers=tuple(_describe(gm, u) for u in source.users if u is not node),
            consumer=_consumer(gm, at_point, calls),
            side=node.target in side))
    return sites


_ADDS = {operator.add, torch.add}


def side_convs(gm: fx.GraphModule) -> set[str]:
    """The convs on side branches: for every add of two computed values, the convs that feed one operand and
    not the other are that operand's path; the convs of the path with fewer convs are on a side branch when the
    other path has more (an identity shortcut is a path of none, so it marks nothing)."""
    side: set[str] = set()
    for node in gm.graph.nodes:
        is_add = (node.op == "call_function" and node.target in _ADDS) or \
            (node.op == "call_method" and node.target == "add")
        if not is_add or len(node.args) < 2 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
            continue
        up = [_upstream(a) for a in node.args[:2]]
        paths = [_convs_in(gm, up[i] - up[1 - i]) for i in (0, 1)]
        short, long = sorted(paths, key=len)
        if len(short) < len(long):
            side |= short
    return side


def _upstream(node: fx.Node) -> set[fx.Node]:
    """The node and every node it is computed from."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack += n.all_input_nodes
    return seen


def _convs_in(gm: fx.GraphModule, nodes: set[fx.Node]) -> set[str]:
    return {n.target for n in nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)}


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Identity, nn.Dropout)
ACTIVATION_FNS = {"relu", "relu6", "hardswish", "silu", "gelu", "leaky_relu", "dropout"}


def _consumer(gm: fx.GraphModule, node: fx.Node, calls: dict[str, list[fx.Node]]) -> str | None:
    """The ungrouped conv that alone reads `node`, through elementwise activations only; else None."""
    while len(node.users) == 1:
        (node,) = node.users
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.Conv2d):
                return node.target if module.groups == 1 and len(calls[node.target]) == 1 else None
            if not isinstance(module, ACTIVATIONS):
                return None
        elif node.op not in ("call_function", "call_method") or \
                getattr(node.target, "__name__", str(node.target)).rstrip("_") not in ACTIVATION_FNS:
            return None
    return None


def _module_calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def _only_once(calls: dict[str, list[fx.Node]], name: str) -> None:
    if len(calls.get(name, ())) != 1:
        raise ValueError(f"module {name!r} is called {len(calls.get(name, ()))} times in the forward; a mask point "
                         "must be a module called exactly once")


def _own_bn(gm: fx.GraphModule, conv: fx.Node, calls: dict[str, list[fx.Node]]) -> str | None:
    users = list(conv.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    reader = users[0]
    if not isinstance(gm.get_submodule(reader.target), nn.BatchNorm2d) or len(calls[reader.target]) != 1:
        return None
    return reader.target if reader.args[0] is conv else None


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    if node.op == "output":
        return "<output>"
    return getattr(node.target, "__name__", str(node.target))


def _shapes(model: nn.Module, gm: fx.GraphModule, image_size: int) -> dict[str, tuple[tuple, tuple]]:
    """Input and output (H, W) of every conv, from one batch-1 forward of zeros in eval mode (no grad)."""
    seen: dict[str, tuple[tuple, tuple]] = {}
    handles = []
    param = next(model.parameters(), None)
    x = torch.zeros(1, 3, image_size, image_size, device=param.device if param is not None else "cpu")
    try:
        for name, module in gm.named_modules():
            if isinstance(module, nn.Conv2d):
                def hook(m: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
                    seen[name] = (tuple(args[0].shape[-2:]), tuple(out.shape[-2:]))
                handles.append(module.register_forward_hook(hook))
        with eval_mode(gm), torch.no_grad():
            gm(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


# --- the cut ----------------------------------------------------------------------------------------------------

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

