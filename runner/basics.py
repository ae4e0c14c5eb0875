"""Records every layer shares: a trial's id, and the protocol training reports its curves to.

Stdlib only, so that the layers that may not import each other (`runner.inputs`, `runner.outputs`) can both
name them. May import: nothing of the project.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol


class TrialId(NamedTuple):
    """One trial: a (layer, criterion)."""

    layer: str
    criterion: str

    @property
    def key(self) -> str:
        """Its name: the W&B run name and the rankings.json key."""
        return f"{self.layer}/{self.criterion}"


class TrainLog(Protocol):
    """Where training reports: its config, every epoch's values, and the checkpoint it saved."""

    def start(self, config: dict[str, Any]) -> None: ...

    def epoch(self, values: dict[str, float]) -> None: ...

    def trained(self, path: str, sha256: str, meta: dict[str, Any]) -> None: ...


class NullTrainLog:
    """A TrainLog that keeps nothing (W&B off, or no run to log to)."""

    def start(self, config: dict[str, Any]) -> None:
        pass

    def epoch(self, values: dict[str, float]) -> None:
        pass

    def trained(self, path: str, sha256: str, meta: dict[str, Any]) -> None:
        pass


SHORT_ID = 12  # characters of a hex digest or a Ray node id shown or used as a short name


def short(hexdigest: str) -> str:
    """The first SHORT_ID characters: how a sha256, a run-id hash or a node id is named in logs and tables."""
    return hexdigest[:SHORT_ID]
