"""A real multi-node Ray cluster on this machine, run as a side process by tests/test_cluster.py:

    python tests/ray_cluster.py NODES [--plain]

starts a head and NODES-1 worker nodes (1 CPU each, all on 127.0.0.1, no dashboard) with
`ray.cluster_utils.Cluster`, prints one JSON line {"address": ..., "nodes": [node ids], "session": its session
folder}, then follows commands on stdin: `remove` kills the newest worker node (its raylet, object store and
workers: a machine lost) and prints {"removed": node id}; end of input shuts the cluster down.

With --plain the cluster is started as a user would start theirs: none of the settings the sweep gives a Ray
of its own (no RAY_AUTH_MODE: Ray's default authentication, or whatever the caller's environment asks for; the
machine's own address rather than 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runner.job.ray_env import ray_env

PLAIN = "--plain" in sys.argv[1:]
if not PLAIN:
    for key, value in ray_env(None).items():
        os.environ.setdefault(key, value)

from ray.cluster_utils import Cluster  # noqa: E402  Ray reads the environment set above when imported


def say(message: dict) -> None:
    print(json.dumps(message), flush=True)


def main(count: int) -> None:
    node = dict(num_cpus=1, include_dashboard=False, object_store_memory=200 * 2**20)
    cluster = Cluster(initialize_head=True, head_node_args=node)
    workers = [cluster.add_node(**{k: v for k, v in node.items() if k != "include_dashboard"})
               for _ in range(count - 1)]
    cluster.wait_for_nodes()
    say({"address": cluster.address, "nodes": [cluster.head_node.node_id] + [w.node_id for w in workers],
         "session": cluster.head_node.get_session_dir_path()})
    try:
        for line in sys.stdin:
            if line.strip() == "remove" and workers:
                gone = workers.pop()
                cluster.remove_node(gone, allow_graceful=False)
                say({"removed": gone.node_id})
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    counts = [a for a in sys.argv[1:] if a.isdigit()]
    main(int(counts[0]) if counts else 3)
