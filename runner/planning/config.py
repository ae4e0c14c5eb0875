"""The grid's `plan` section (DESIGN §10): budgets, methods, channel rounding, fine-tuning, the scoring split.

    plan:
      budgets: [{macs: 0.5}, {params: 0.6}]   # fraction of the base model's MACs / params to keep
      methods: [knapsack, threshold, uniform]
      round_to: 1                             # channel counts kept as multiples of this (8 for tensor cores)
      min_keep: 0.1                           # never keep fewer than this fraction of a unit's channels
      finetune: {epochs: 2, lr: 0.01}         # keys as in checkpoint.train; epochs 0 = no fine-tuning
      score_on: eval                          # eval: the sweep's eval images; test: the whole test split

A frozen, validated section like the rest of the grid (`runner.config`); `Grid` gains `plan: PlanConfig` when
`prune-sweep prune` is wired. Until then `parse_plan` validates the section on its own, with the same one-line
errors (key path from `plan.`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from runner.config import Allowed, Distinct, Section, TrainConfig, _invalid, _one_line
from runner.errors import InputError
from runner.planning.curves import allowed_keeps

Method = Literal["knapsack", "threshold", "uniform"]
METHODS: tuple[str, ...] = Method.__args__
KINDS = ("macs", "params")
FRACTION = "a fraction of the base model to keep, 0 < f < 1"


class Budget(Section):
    """What a plan must reach: exactly one of `macs` or `params`, the fraction of the base model's to keep."""

    macs: Annotated[float | None, Field(gt=0, lt=1), Allowed(FRACTION)] = None
    params: Annotated[float | None, Field(gt=0, lt=1), Allowed(FRACTION)] = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Budget":
        if (self.macs is None) == (self.params is None):
            raise _invalid("give exactly one of macs, params", "{macs: 0.5} or {params: 0.6}",
                           "write one budget per list item")
        return self

    @property
    def kind(self) -> str:
        """macs or params."""
        return "macs" if self.macs is not None else "params"

    @property
    def keep(self) -> float:
        """The fraction of the base model's MACs or params the plan may keep."""
        return self.macs if self.macs is not None else self.params

    @property
    def label(self) -> str:
        """Its name in folders and tables: macs0.5, params0.6."""
        return f"{self.kind}{self.keep:g}"


class FinetuneConfig(TrainConfig):
    """The fine-tuning recipe: the keys of checkpoint.train (unset keys from the named recipe); epochs 0 = none."""

    epochs: int = Field(2, ge=0, le=10_000)
    lr: float | None = Field(0.01, gt=0)


class PlanConfig(Section):
    budgets: Annotated[list[Budget], Field(min_length=1), Allowed("a list of {macs: f} or {params: f}")] = [
        Budget(macs=0.5)]
    methods: Annotated[list[Method], Field(min_length=1), Distinct, Allowed(", ".join(METHODS))] = list(METHODS)
    round_to: int = Field(1, ge=1, le=1024)  # channels kept per unit: a multiple of this (or the unit untouched)
    min_keep: float = Field(0.1, ge=0, lt=1)  # never keep fewer than this fraction of a unit's channels (and >= 1)
    finetune: FinetuneConfig = FinetuneConfig()
    # which images give the final figures: eval = the sweep's own eval images (the ones that chose the plan, so
    # its numbers are flattered: the report says so), test = the whole test split
    score_on: Literal["eval", "test"] = "eval"
    max_corrections: int = Field(8, ge=0, le=1000)  # combined-plan corrections (one eval pass each); 0 = none

    @field_validator("budgets")
    @classmethod
    def _distinct_budgets(cls, v: list[Budget]) -> list[Budget]:
        labels = [b.label for b in v]
        dup = next((x for x in labels if labels.count(x) > 1), None)
        if dup:
            raise _invalid(f"duplicate budget {dup}", "each budget once", "remove the duplicate")
        return v


class _Grid(Section):
    """The section where it sits in a grid file, so that errors name the key from `plan.`."""

    plan: PlanConfig = PlanConfig()


def parse_plan(raw: Any, source: str) -> PlanConfig:
    """Validate a `plan` mapping; every problem becomes a one-line InputError naming `source`."""
    wrapped = {"plan": raw}
    try:
        return _Grid.model_validate(wrapped).plan
    except ValidationError as e:
        raise _one_line(e, wrapped, source, root=_Grid) from None


def check_plan(plan: PlanConfig, channels: dict[str, int]) -> None:
    """What needs the network: every unit must have a K a plan can choose besides 0 with this round_to and
    min_keep, or the plan is pointless; raise when no unit has one."""
    if channels and not any(allowed_keeps(c, plan.round_to, plan.min_keep) for c in channels.values()):
        widest = max(channels.values())
        raise InputError("plan.round_to", plan.round_to, "no unit can be pruned with this round_to and min_keep",
                         f"a round_to below the widest unit's channels ({widest})",
                         "lower plan.round_to or plan.min_keep")

