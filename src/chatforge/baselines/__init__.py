"""Non-neural baselines. Importing this package registers them with :mod:`chatforge.registry`."""

from chatforge.baselines import ensemble, linear, xgboost  # noqa: F401  (register their families)
from chatforge.baselines.xgboost import XGBoostConfig, XGBoostTextClassifier

__all__ = ["XGBoostConfig", "XGBoostTextClassifier"]
