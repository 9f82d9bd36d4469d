"""The linear baseline: TF-IDF -> logistic regression or a linear SVM."""

from chatforge.baselines.linear.config import LinearConfig
from chatforge.baselines.linear.model import LinearTextClassifier, build
from chatforge.registry import register_family

__all__ = [
    "LinearConfig",
    "LinearTextClassifier",
    "build",
]

register_family("linear", config_cls=LinearConfig, builder=build, tasks=("classification",), kind="estimator",
                requires=lambda cfg: ("sklearn", "scipy"))  # TF-IDF features
