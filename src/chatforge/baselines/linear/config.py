"""The linear baseline's typed config, validated at config load."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from chatforge.baselines.tfidf import TfidfConfig


@dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class LinearConfig(TfidfConfig):
    """Hyper-parameters of :class:`LinearTextClassifier` (unknown keys and bad values are rejected).

    ``C`` is the inverse L2 strength of scikit-learn's ``LogisticRegression`` (``loss: logistic``)
    or ``LinearSVC`` (``loss: svm``); TF-IDF rows are unit-norm, so for logistic regression values
    well above 1 fit best (10-30 on CLINC150), for the SVM about 1. ``temperature`` scales the
    SVM's margins before the softmax that turns them into probabilities (unused for logistic). ``max_features`` caps each
    vocabulary (word and char separately; None: no cap). ``class_weight: balanced`` up-weights
    rare classes (CLINC's 100 ``oos_train`` examples against 150 x 100 in-scope ones).

    ``outliers``: a UTF-8 text file of unlabelled out-of-domain sentences, one per line (CLINC150 ships
    14,750 Wikipedia sentences, ``all_wiki_sents.txt``), used for outlier exposure (Hendrycks et al.
    2019, "Deep Anomaly Detection with Outlier Exposure"): not as examples of any class (the ``oos`` class
    included), but as negatives of every class, each weighing ``outlier_weight`` of a training example
    (fitted as one extra background class whose weights are dropped after fitting, so every class's
    score is pushed down on them and the answer's probability flattens). Read at fit time only.
    """

    C: float = Field(10.0, gt=0.0, le=1e6)
    loss: Literal["logistic", "svm"] = "logistic"
    temperature: float = Field(10.0, gt=0.0, le=1e4)
    class_weight: Literal["balanced"] | None = None
    max_iter: int = Field(1000, ge=1, le=100000)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # the range scikit-learn and NumPy take
    outliers: str | None = None
    outlier_weight: float = Field(0.1, gt=0.0, le=100.0)

