"""The progress board: the driver's record of finished points, as a named Ray actor that trials on any node
can ask. Kept free of torch and of the engine: the actor's process imports only this module.

A board exists only where a trial can find points of its own already measured: from the start of a resumed
sweep, and from a new sweep's first retried trial on. A sweep that retries nothing never starts one (its
process took CPU from the trials while they started)."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@dataclass(frozen=True)
class BoardStats:
    """What the driver's collector counted (runner.job.collector.measured)."""

    measured: int  # points measured in this run, measured again by a retried trial included
    first: float  # wall-clock time the first point reached the driver (0: none)
    last: float  # ... and the last one


class ProgressBoard:
    """The driver's record of finished points (results.csv), readable by trials on any node: a named Ray
    actor, so that a trial restarted after a crash or a resume skips what is already measured."""

    def __init__(self, done: list[tuple[str, str, int, int]]) -> None:
        self.done: dict[tuple[str, str], set[tuple[int, int]]] = {}
        for layer, criterion, k, repeat in done:
            self.done.setdefault((layer, criterion), set()).add((k, repeat))

    def record(self, points: list[tuple[str, str, int, int]]) -> None:
        """Points (layer, criterion, K, repeat) measured since the last call (perhaps again, by a retried trial).
        The collector sends them in batches (Collector.flush)."""
        for layer, criterion, k, repeat in points:
            self.done.setdefault((layer, criterion), set()).add((k, repeat))

    def finished(self, layer: str, criterion: str) -> list[tuple[int, int]]:
        """(K, repeat) of the trial's points already in results.csv."""
        return sorted(self.done.get((layer, criterion), ()))


def board_actor(name: str, done: list[tuple[str, str, int, int]]) -> ray.actor.ActorHandle:
    """Start the named board with the points `done`, on the driver's own node: losing another node of a cluster
    then costs only the trials that ran there."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ProgressBoard).options(name=name, lifetime=None,
                                                         scheduling_strategy=here).remote(done)


def find_board(name: str) -> ray.actor.ActorHandle | None:
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


def kill_board(name: str) -> None:
    """Stop the named board, if there is one (this driver's, or one an earlier driver of the sweep left)."""
    board = find_board(name)
    if board is not None:
        ray.kill(board)


def finished(name: str, layer: str, criterion: str) -> set[tuple[int, int]]:
    """In a trial: (K, repeat) of its points already in results.csv. A sweep has a board only once points can be
    measured twice (a resumed sweep, a retried trial: see runner.job.collector); with none, nothing is."""
    board = find_board(name)
    return set() if board is None else {tuple(p) for p in ray.get(board.finished.remote(layer, criterion))}
