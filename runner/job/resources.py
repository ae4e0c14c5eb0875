"""What each trial asks Ray for, and whether the cluster can ever give it (checked before any trial starts).

Tune waits, silently, for resources that no node has: `gpus_per_trial: 1` on a cluster without GPUs, or more
`cpus_per_trial` than any node holds. So, right after Ray starts, every trial's request is compared with the
cluster's nodes: a request that fits no node is refused (one line, exit 2), unless an autoscaler may still add
a node that fits; then the sweep says it waits for one, and with what request.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from runner.config import ResourcesConfig
from runner.errors import InputError

log = logging.getLogger(__name__)

GPU_SHARE = 0.25  # gpus_per_trial: auto -> four trials share a GPU (evaluation alone rarely fills one)
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # what the cluster launcher leaves on an autoscaling head


def trial_request(cfg: ResourcesConfig, cluster_gpus: float) -> dict[str, float]:
    """Tune's resources for one trial (`tune.with_resources`): auto GPUs are a quarter GPU when there are any."""
    gpus = cfg.gpus_per_trial
    if gpus == "auto":
        gpus = GPU_SHARE if cluster_gpus > 0 else 0.0
    return {"cpu": float(cfg.cpus_per_trial), "gpu": float(gpus)}


@dataclass(frozen=True)
class Nodes:
    """What the cluster has, and what it may grow to."""

    sizes: tuple[tuple[float, float], ...]  # (CPUs, GPUs) of every alive node
    autoscaling: bool  # an autoscaler may add nodes
    node_types: tuple[tuple[float, float], ...] | None = None  # (CPUs, GPUs) of each node type it may add, if known


def fits(request: dict[str, float], size: tuple[float, float]) -> bool:
    return request["cpu"] <= size[0] and request["gpu"] <= size[1]


def _largest(sizes: Sequence[tuple[float, float]]) -> str:
    if not sizes:
        return "no node at all"
    cpus, gpus = max(s[0] for s in sizes), max(s[1] for s in sizes)
    return f"at most {cpus:g} CPUs and {gpus:g} GPUs on a node"


def shown_request(request: dict[str, float]) -> str:
    return f"{{CPU: {request['cpu']:g}, GPU: {request['gpu']:g}}}"


def verdict(request: dict[str, float], nodes: Nodes, trials: int) -> str | None:
    """None when some node fits a trial now; a line for the log when the trials must wait for an autoscaler;
    raises InputError when no node can ever run a trial."""
    if any(fits(request, s) for s in nodes.sizes):
        return None
    can_grow = nodes.autoscaling and (nodes.node_types is None or any(fits(request, t) for t in nodes.node_types))
    if can_grow:
        return (f"resources: no node of the cluster can run a trial yet ({len(nodes.sizes)} node(s), "
                f"{_largest(nodes.sizes)}); the cluster autoscales, so the trials wait for it to add one: "
                f"{trials} trial(s), each asking for {shown_request(request)} (`ray status` shows the request)")
    pool = list(nodes.sizes) + list(nodes.node_types or ())
    where = f"{len(nodes.sizes)} node(s), " + ("and no node type of its autoscaler fits either, "
                                                if nodes.autoscaling else "not autoscaling, ") + _largest(pool)
    most_cpus, most_gpus = max((s[0] for s in pool), default=0), max((s[1] for s in pool), default=0)
    if request["gpu"] > most_gpus:
        amount = "0 or auto (no node has a GPU)" if most_gpus == 0 else f"at most {most_gpus:g}, or auto"
        raise InputError("resources.gpus_per_trial", _number(request["gpu"]),
                         f"no node of the Ray cluster has that many GPUs ({where})", amount,
                         "set resources.gpus_per_trial: auto, or join a cluster with GPUs (--address)")
    if request["cpu"] > most_cpus:
        raise InputError("resources.cpus_per_trial", _number(request["cpu"]),
                         f"no node of the Ray cluster has that many CPUs ({where})", f"at most {most_cpus:g}",
                         f"set resources.cpus_per_trial to {most_cpus:g} or less, or join a cluster with bigger "
                         "nodes (--address)")
    raise InputError("resources", shown_request(request), f"no single node of the Ray cluster has both ({where})",
                     "CPUs and GPUs per trial that one node holds",
                     "lower resources.cpus_per_trial or resources.gpus_per_trial")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


# ---- reading the cluster (Ray is imported only here, inside functions) ----

def alive_nodes() -> tuple[tuple[float, float], ...]:
    import ray

    return tuple((float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
                 for n in ray.nodes() if n.get("Alive"))


def autoscaler_node_types(status: dict[str, Any] | None) -> list[str]:
    """Node types of a (v1) autoscaler's status report that come from an autoscaling config. A cluster started by
    hand also runs Ray's monitor, in read-only mode, which names each node's type after the node itself."""
    report = (status or {}).get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    types = set(mapping.values()) | set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
    readonly = {f"node_{node}" for node in mapping}
    return sorted(t for t in types if t not in readonly and not t.startswith("node_"))


def bootstrap_node_types(path: str = BOOTSTRAP_CONFIG) -> tuple[tuple[float, float], ...] | None:
    """(CPUs, GPUs) of each node type in the cluster launcher's config on this head, when it names them all."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        return None
    try:
        types = (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("available_node_types") or {}
        sizes = [(float(t["resources"]["CPU"]), float(t["resources"].get("GPU", 0))) for t in types.values()]
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError):
        return None
    return tuple(sizes) or None


def autoscaling() -> bool:
    """Whether an autoscaler may add nodes: a cluster-launcher head (Tune's own test), autoscaler v2 (KubeRay),
    or a v1 autoscaler whose node types come from a config. Any doubt reads as no."""
    if Path(BOOTSTRAP_CONFIG).expanduser().is_file():
        return True
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            return True
    except Exception:  # noqa: BLE001  a private API that moves between Ray versions
        pass
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get("__autoscaling_status")
        return bool(raw and autoscaler_node_types(json.loads(raw)))
    except Exception:  # noqa: BLE001  a private API too: unknown means not autoscaling
        return False


def cluster_nodes() -> Nodes:
    scales = autoscaling()
    return Nodes(alive_nodes(), scales, bootstrap_node_types() if scales else None)


def check_fit(cfg: ResourcesConfig, trials: int) -> dict[str, float]:
    """Every trial's request checked against the running cluster (inside `ray_session`); returns the request."""
    import ray

    request = trial_request(cfg, ray.cluster_resources().get("GPU", 0))
    waiting = verdict(request, cluster_nodes(), trials)
    if waiting:
        log.warning(waiting)
    return request

