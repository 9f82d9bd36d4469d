"""Linear models over TF-IDF word + character n-grams: the cheapest strong intent baseline.

Logistic regression (multinomial, L2; ``loss: logistic``, the default) or a linear SVM
(one-vs-rest squared hinge, ``loss: svm``) on sublinear TF-IDF of word 1..n-grams and ``char_wb``
2..5-grams. On CLINC150 character n-gram linear models are as strong as anything trained from
scratch (Larson et al. 2019, Table 2: SVM 91.0 in-scope accuracy with word features alone; with
character n-grams the SVM reaches 93.3 here, logistic regression 92.4). The oos threshold and
ensembles need probabilities, not margins: the SVM's are ``softmax(temperature * margin)``, a
fixed monotone map (argmax and rankings are the SVM's own), with ``temperature`` a config value.

Weights are saved as safetensors (numpy, no pickle) and the vectorizers' vocabulary + idf as
JSON, so loading a bundle executes nothing from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save as st_save

from chatforge.baselines.linear.config import LinearConfig
from chatforge.baselines.tfidf import TfidfFeatures, TfidfTextClassifier, check_texts, read_saved_meta
from chatforge.data.readers import read_outliers
from chatforge.fileio import atomic_write_bytes, atomic_write_json
from chatforge.registry import BuildContext

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "linear_meta.json"
VECTORIZERS_FILE = "linear_vectorizers.json"
WEIGHTS_FILE = "linear_weights.safetensors"
# The outlier-exposure background class (see LinearConfig.outliers); no data label can be this.
BACKGROUND = "\x00outlier-exposure"


class LinearTextClassifier(TfidfTextClassifier):
    """TF-IDF (word + char_wb n-grams) -> multinomial logistic regression.

    The estimator protocol chatforge's run driver, bundles and ensembles rely on:
    ``fit(texts, labels, valid_texts=None, valid_labels=None)``, ``predict_proba(texts)`` (columns
    in ``labels`` order), ``predict``, ``labels``, ``save(dir)`` and ``load(dir)`` (JSON +
    safetensors, never pickle).
    """

    def __init__(self, config: LinearConfig | None = None) -> None:
        self.config = config if config is not None else LinearConfig()
        self.labels: list[str] = []
        self._features_: TfidfFeatures | None = None
        self._coef: np.ndarray | None = None  # (C, F) or (1, F) for two classes, as scikit-learn
        self._intercept: np.ndarray | None = None

    def fit(self, texts: Sequence[str], labels: Sequence[str], valid_texts: Sequence[str] | None = None,
            valid_labels: Sequence[str] | None = None) -> LinearTextClassifier:
        """Fit on ``texts``; validation data, when given, is only scored and logged (no early stopping)."""
        # lazy: scikit-learn takes seconds to import; families.py registers every family at startup
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import LinearSVC

        texts = check_texts(texts, "texts")
        labels = [str(y) for y in labels]
        if len(texts) != len(labels):
            raise ValueError(f"texts and labels must have the same length, got {len(texts)} and {len(labels)}")
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ValueError(f"need at least 2 distinct labels to train a classifier, got {classes}")
        self._features_ = TfidfFeatures.from_config(self.config)
        x = self._features_.fit_transform(texts)
        logger.info("linear baseline: %d examples, %d classes, %d features", x.shape[0], len(classes), x.shape[1])
        weight = None
        if self.config.outliers:
            outliers = read_outliers(self.config.outliers, key="model.outliers")
            import scipy.sparse as sp  # train extra only (see baselines/tfidf.py), like scikit-learn above

            # The vocabulary stays the training data's: the outliers only add negatives over it.
            x = sp.vstack([x, self._features_.transform(outliers)], format="csr")
            labels = labels + [BACKGROUND] * len(outliers)
            weight = np.concatenate([np.ones(len(texts)), np.full(len(outliers), self.config.outlier_weight)])
            logger.info("linear baseline: outlier exposure with %d sentences from %s, weight %g",
                        len(outliers), self.config.outliers, self.config.outlier_weight)
        if self.config.loss == "svm":
            clf = LinearSVC(C=self.config.C, max_iter=self.config.max_iter, class_weight=self.config.class_weight,
                            random_state=self.config.seed)
        else:
            clf = LogisticRegression(C=self.config.C, max_iter=self.config.max_iter,
                                     class_weight=self.config.class_weight, random_state=self.config.seed)
        clf.fit(x, labels, sample_weight=weight)
        self.labels = [str(c) for c in clf.classes_]  # sorted, as classes
        self._coef = clf.coef_.astype(np.float32)
        self._intercept = clf.intercept_.astype(np.float32)
        if self.config.outliers:
            self._drop_background()
        if valid_texts is not None and valid_labels is not None and len(valid_texts):
            pred = self.predict(valid_texts)
            acc = float(np.mean([p == str(y) for p, y in zip(pred, valid_labels, strict=True)]))
            logger.info("linear baseline: validation accuracy %.4f", acc)
        return self

    def _drop_background(self) -> None:
        """Remove the outlier-exposure background class: served models answer only the data's labels."""
        keep = [i for i, c in enumerate(self.labels) if c != BACKGROUND]
        coef, intercept = self._coef[keep], self._intercept[keep]
        if len(keep) == 2:  # the binary layout (one row, for the second class): w1 - w0 gives the same softmax
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        self.labels = [self.labels[i] for i in keep]
        self._coef, self._intercept = np.ascontiguousarray(coef), np.ascontiguousarray(intercept)

    def _is_fitted(self) -> bool:
        return self._coef is not None

    def _proba(self, features) -> np.ndarray:
        z = np.asarray(features @ self._coef.T) + self._intercept  # (N, C) or (N, 1)
        if self.config.loss == "svm":
            z = z * self.config.temperature  # margins -> logits (module docstring)
        if z.shape[1] == 1:  # binary: scikit-learn keeps one weight row, for the second class
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1).astype(np.float32)
        z = z - z.max(axis=1, keepdims=True)  # stable softmax
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``linear_meta.json``, ``linear_vectorizers.json`` and ``linear_weights.safetensors``."""

        self._require_fitted()
        d = Path(directory)
        vecs = self._features_.to_json()
        atomic_write_bytes(d / WEIGHTS_FILE, st_save({"coef": np.ascontiguousarray(self._coef),
                                                      "intercept": np.ascontiguousarray(self._intercept)}))
        atomic_write_json(d / VECTORIZERS_FILE, vecs)
        atomic_write_json(d / META_FILE, {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(self.config),
                                          "labels": self.labels})
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LinearTextClassifier:
        d = Path(directory)
        meta = read_saved_meta(d, (META_FILE, VECTORIZERS_FILE, WEIGHTS_FILE), META_FILE, FORMAT_VERSION, "LinearTextClassifier")
        self = cls(LinearConfig(**meta["config"]))
        self.labels = list(meta["labels"])
        self._features_ = TfidfFeatures.from_json(json.loads((d / VECTORIZERS_FILE).read_text(encoding="utf-8")))
        w = load_file(str(d / WEIGHTS_FILE))
        self._coef, self._intercept = w["coef"], w["intercept"]
        n_rows = self._coef.shape[0]
        if n_rows != (1 if len(self.labels) == 2 else len(self.labels)):
            raise ValueError(f"{d / WEIGHTS_FILE} has {n_rows} weight rows for {len(self.labels)} labels")
        return self


def build(cfg: LinearConfig, ctx: BuildContext) -> LinearTextClassifier:
    """Registry builder; labels come from the data at ``fit`` time."""
    return LinearTextClassifier(cfg)
