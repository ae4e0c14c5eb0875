"""Any traceable CNN as a graph (torch.fx), with no in-place operations.

`trace` turns the model into a GraphModule that shares the model's weights and has no in-place operations, so
that values kept from one call can be read by later calls unchanged. Code generated from that graph (the cut's
prefix and suffix, `model.cut`) puts the in-place operations back where nothing else reads the value
(`_reinplace`). `eval_mode` holds a model in eval mode for a block.
"""

from __future__ import annotations

import copy
import inspect
import operator
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from torch import Tensor, fx, nn

# In-place Python operators and their out-of-place versions.
_OUT_OF_PLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor, operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
    operator.imatmul: operator.matmul,
}
_VIEWS = {"getitem", "view", "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "permute", "narrow",
          "select", "expand", "as_strided", "t", "unflatten", "view_as", "expand_as", "diagonal", "movedim", "chunk",
          "split", "unbind", "swapaxes", "swapdims"}
_SAFE = "_prune_sweep_no_inplace"  # set on GraphModules made by `trace`


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
