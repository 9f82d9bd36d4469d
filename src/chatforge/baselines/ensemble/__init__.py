"""The ensemble baseline: weighted averaging or stacking over member bundles."""

from chatforge.baselines.ensemble.model import EnsembleClassifier, EnsembleConfig, EnsembleError, build

__all__ = [
    "EnsembleClassifier",
    "EnsembleConfig",
    "EnsembleError",
    "build",
]
