"""The XGBoost baseline: TF-IDF word + char n-grams -> gradient-boosted trees."""

from chatforge.baselines.xgboost.config import XGBoostConfig
from chatforge.baselines.xgboost.model import XGBoostTextClassifier, build
from chatforge.registry import register_family

__all__ = [
    "XGBoostConfig",
    "XGBoostTextClassifier",
    "build",
]

register_family("xgboost", config_cls=XGBoostConfig, builder=build, tasks=("classification",), kind="estimator",
                requires=lambda cfg: ("sklearn", "scipy", "xgboost"))  # TF-IDF features and trees
