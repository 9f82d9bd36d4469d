"""The linear baseline: TF-IDF -> logistic regression or a linear SVM."""

from chatforge.baselines.linear.model import LinearConfig, LinearTextClassifier, build

__all__ = [
    "LinearConfig",
    "LinearTextClassifier",
    "build",
]
