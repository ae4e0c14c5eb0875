"""The progress board: the driver's record of finished points, as a named Ray actor that trials on any node
can ask. Kept free of torch and of the engine: the actor's process imports only this module."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@dataclass(frozen=True)
class BoardStats:
    measured: int  # points measured in this run, measured again by a retried trial included
    first: float  # wall-clock time the first point reached the driver (0: none)
    last: float  # ... and the last one


class ProgressBoard:
    """The driver's record of finished points (results.csv), readable by trials on any node: a named Ray
    actor, so that a trial restarted after a crash or a resume skips what is already measured."""

    def __init__(self, done: list[tuple[str, str, int, int]]) -> None:
        self.done: dict[tuple[str, str], set[tuple[int, int]]] = {}
        self.measured = 0  # points measured in this run, measured again by a retried trial included
        self.first = self.last = 0.0  # wall-clock times of the first and the last point measured in this run
        for layer, criterion, k, repeat in done:
            self.done.setdefault((layer, criterion), set()).add((k, repeat))

    def record(self, points: list[tuple[str, str, int, int, float]]) -> None:
        """Points (layer, criterion, K, repeat) measured (perhaps again, by a retried trial), each with the time
        it reached the driver, in order. The collector sends them in batches (see Collector.flush)."""
        for layer, criterion, k, repeat, when in points:
            self.done.setdefault((layer, criterion), set()).add((k, repeat))
            self.measured += 1
            self.first = self.first or when
            self.last = when

    def stats(self) -> BoardStats:
        return BoardStats(self.measured, self.first, self.last)

    def finished(self, layer: str, criterion: str) -> list[tuple[int, int]]:
        """(K, repeat) of the trial's points already in results.csv."""
        return sorted(self.done.get((layer, criterion), ()))


def board_actor(name: str, done: list[tuple[str, str, int, int]]) -> ray.actor.ActorHandle:
    """Start the named board (replacing one left by an earlier driver of the same sweep), on the driver's own
    node: losing another node of a cluster then costs only the trials that ran there."""
    try:
        ray.kill(ray.get_actor(name))
    except ValueError:
        pass
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ProgressBoard).options(name=name, lifetime=None,
                                                         scheduling_strategy=here).remote(done)
