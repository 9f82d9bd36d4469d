"""The ensemble baseline's typed config, validated at config load."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass


@dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class EnsembleConfig:
    """``members``: bundle folders (or run folders holding ``bundle/``), at least two.

    ``method``: ``average`` (the weighted arithmetic mean of the members' probabilities), ``geometric``
    (their weighted geometric mean, renormalised: log-linear pooling) or ``stacking`` (a meta-learner
    fitted on validation). ``weights`` (``average`` and ``geometric``): one non-negative weight per
    member, normalised to sum to 1; default equal. ``C``, ``max_iter``: the stacking meta-learner's L2
    inverse strength and budget.
    """

    members: list[str] = Field(default_factory=list)
    method: Literal["average", "geometric", "stacking"] = "average"
    weights: list[float] | None = None
    C: float = Field(1.0, gt=0.0, le=1e6)
    max_iter: int = Field(1000, ge=1, le=100000)

    @model_validator(mode="after")
    def _check(self):
        if len(self.members) < 2:
            raise ValueError(f"members: an ensemble needs at least 2 member bundles, got {len(self.members)}")
        if self.weights is not None:
            if self.method == "stacking":
                raise ValueError("weights apply to methods 'average' and 'geometric' only; stacking learns its own")
            if len(self.weights) != len(self.members):
                raise ValueError(f"weights: need one weight per member ({len(self.members)}), got {len(self.weights)}")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"weights must be >= 0 with a positive sum, got {self.weights}")
        return self
