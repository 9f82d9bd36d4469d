"""Non-neural baselines. Importing this package registers them with :mod:`chatforge.registry`."""

from chatforge.baselines import xgboost  # noqa: F401  (registers the "xgboost" family)
from chatforge.baselines.xgboost import XGBoostConfig, XGBoostTextClassifier

__all__ = ["XGBoostConfig", "XGBoostTextClassifier"]
