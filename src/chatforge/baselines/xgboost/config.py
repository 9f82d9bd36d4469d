"""The XGBoost baseline's typed config, validated at config load."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from chatforge.baselines.tfidf import TfidfConfig


@dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class XGBoostConfig(TfidfConfig):
    """Hyper-parameters of :class:`XGBoostTextClassifier` (unknown keys and bad values are rejected).

    ``max_features`` caps each vocabulary (word and char separately). ``max_bin`` (histogram
    bins per feature) defaults to 32 rather than XGBoost's 256: TF-IDF columns are mostly
    presence signals, and split search costs features x bins x classes per node, which dominates
    with 150 intents. ``early_stopping_rounds`` applies only when validation data is given;
    0 disables it.
    """

    max_features: int = Field(50000, ge=1)
    n_estimators: int = Field(200, ge=1, le=100000)
    max_depth: int = Field(6, ge=1, le=32)
    learning_rate: float = Field(0.3, gt=0.0, le=1.0)
    subsample: float = Field(1.0, gt=0.0, le=1.0)
    colsample_bytree: float = Field(1.0, gt=0.0, le=1.0)
    max_bin: int = Field(32, ge=2, le=1024)
    tree_method: Literal["hist", "approx", "exact"] = "hist"
    early_stopping_rounds: int = Field(20, ge=0)
    n_jobs: int = Field(2, ge=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # the range scikit-learn and NumPy take

