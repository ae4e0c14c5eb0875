"""The convs of any traceable CNN, read off its traced graph (`model.tracing`), in execution order.

`list_convs` lists every nn.Conv2d with its shapes, the BN that alone reads its output, what reads its mask
point, the conv that alone consumes its output, and whether it sits on a side branch (`side_convs`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from model.mask import TARGETS, MaskPoint
from model.tracing import eval_mode, trace


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
