"""The ensemble baseline: weighted averaging or stacking over member bundles."""

from chatforge.baselines.ensemble.config import EnsembleConfig
from chatforge.baselines.ensemble.model import EnsembleClassifier, EnsembleError, build
from chatforge.registry import register_family

__all__ = [
    "EnsembleClassifier",
    "EnsembleConfig",
    "EnsembleError",
    "build",
]

register_family("ensemble", config_cls=EnsembleConfig, builder=build, tasks=("classification",), kind="estimator")
