"""The XGBoost baseline: TF-IDF word + char n-grams -> gradient-boosted trees."""

from chatforge.baselines.xgboost.model import XGBoostConfig, XGBoostTextClassifier, build

__all__ = [
    "XGBoostConfig",
    "XGBoostTextClassifier",
    "build",
]
