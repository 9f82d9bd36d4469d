"""XGBoost over TF-IDF n-grams: the recommended first run on any new intent data set.

Minutes on a laptop CPU, no tokenizer to train, and a number every neural family must beat.
Features are TF-IDF word n-grams plus ``char_wb`` character n-grams (robust to typos and to
Korean's agglutinative spacing), stacked into one sparse matrix for gradient-boosted trees
(Chen & Guestrin 2016, "XGBoost: A Scalable Tree Boosting System").

This module is named ``xgboost`` inside ``chatforge.baselines``; absolute imports (``import
xgboost``) still reach the library, and the heavy libraries are imported lazily so that
registering the family costs nothing at startup.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from chatforge.baselines.tfidf import TfidfFeatures, TfidfTextClassifier, check_texts, read_saved_meta
from chatforge.baselines.xgboost.config import XGBoostConfig
from chatforge.fileio import atomic_write_bytes, atomic_write_json
from chatforge.predictions import ClassPrediction
from chatforge.registry import BuildContext

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "xgb_model.json"
VECTORIZERS_FILE = "vectorizers.json"
META_FILE = "xgb_meta.json"


class XGBoostTextClassifier(TfidfTextClassifier):
    """TF-IDF (word + char_wb n-grams) -> XGBoost multi-class classifier (Chen & Guestrin 2016).

    ``fit`` / ``predict_proba`` / ``predict`` / ``classify``; ``save`` / ``load`` use JSON only
    (vectorizer vocabulary + idf + parameters, and XGBoost's JSON model), never pickle, so a
    bundle can be loaded without executing anything from it.
    """

    def __init__(self, config: XGBoostConfig | None = None) -> None:
        self.config = config if config is not None else XGBoostConfig()
        self.labels: list[str] = []
        self.best_iteration: int | None = None
        self._features_: TfidfFeatures | None = None
        self._booster = None

    # -- training ------------------------------------------------------------------------------------

    def fit(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        valid_texts: Sequence[str] | None = None,
        valid_labels: Sequence[str] | None = None,
    ) -> XGBoostTextClassifier:
        import xgboost  # lazy: xgboost takes seconds to import; families.py registers every family at startup

        cfg = self.config
        texts = check_texts(texts, "texts")
        labels = [str(y) for y in labels]
        if len(texts) != len(labels):
            raise ValueError(f"texts and labels must have the same length, got {len(texts)} and {len(labels)}")
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ValueError(f"need at least 2 distinct labels to train a classifier, got {classes}")
        if (valid_texts is None) != (valid_labels is None):
            raise ValueError("give both valid_texts and valid_labels, or neither")
        index = {c: i for i, c in enumerate(classes)}

        self._features_ = TfidfFeatures.from_config(cfg)
        x = self._features_.fit_transform(texts)
        y = np.array([index[c] for c in labels])
        logger.info("xgboost baseline: %d examples, %d classes, %d features", x.shape[0], len(classes), x.shape[1])

        eval_set = None
        if valid_texts is not None:
            valid_texts = check_texts(valid_texts, "valid_texts")
            valid_labels = [str(v) for v in valid_labels]
            if len(valid_texts) != len(valid_labels):
                raise ValueError("valid_texts and valid_labels must have the same length")
            unknown = sorted(set(valid_labels) - set(index))
            if unknown:
                raise ValueError(f"valid_labels has labels absent from training labels: {unknown[:10]}")
            eval_set = [(self._features(valid_texts), np.array([index[c] for c in valid_labels]))]

        model = xgboost.XGBClassifier(
            n_estimators=cfg.n_estimators,
            max_depth=cfg.max_depth,
            learning_rate=cfg.learning_rate,
            subsample=cfg.subsample,
            colsample_bytree=cfg.colsample_bytree,
            tree_method=cfg.tree_method,
            max_bin=cfg.max_bin,
            n_jobs=cfg.n_jobs,
            random_state=cfg.seed,
            early_stopping_rounds=cfg.early_stopping_rounds if (eval_set and cfg.early_stopping_rounds) else None,
        )
        model.fit(x, y, eval_set=eval_set, verbose=False)
        self._booster = model.get_booster()
        self.labels = classes
        self.best_iteration = getattr(model, "best_iteration", None) if eval_set else None
        logger.info("xgboost baseline trained (best iteration %s)", self.best_iteration)
        return self

    # -- inference -----------------------------------------------------------------------------------

    def _is_fitted(self) -> bool:
        return self._booster is not None

    def _proba(self, features) -> np.ndarray:
        iteration_range = (0, self.best_iteration + 1) if self.best_iteration is not None else (0, 0)
        p = np.asarray(self._booster.inplace_predict(features, iteration_range=iteration_range), dtype=np.float32)
        if p.ndim == 1:  # binary:logistic returns P(class 1) only
            p = np.stack([1.0 - p, p], axis=1)
        return p

    def classify(self, texts: Sequence[str], top_k: int = 5) -> list[ClassPrediction]:
        """Arg-max predictions with the ``top_k`` class probabilities (``chatforge.predictions.ClassPrediction``)."""
        probs = self.predict_proba(texts)
        out = []
        for row in probs:
            top = np.argsort(-row, kind="stable")[:top_k]
            out.append(ClassPrediction(
                label=self.labels[int(top[0])],
                score=float(row[top[0]]),
                scores={self.labels[int(j)]: float(row[j]) for j in top},
            ))
        return out

    # -- persistence (JSON only) ------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``xgb_model.json``, ``vectorizers.json`` and ``xgb_meta.json`` atomically."""
        self._require_fitted()
        d = Path(directory)
        vecs = self._features_.to_json()
        atomic_write_bytes(d / MODEL_FILE, bytes(self._booster.save_raw(raw_format="json")))
        atomic_write_json(d / VECTORIZERS_FILE, vecs)
        atomic_write_json(d / META_FILE, {
            "format_version": FORMAT_VERSION,
            "config": dataclasses.asdict(self.config),
            "labels": self.labels,
            "best_iteration": self.best_iteration,
        })
        logger.info("saved xgboost baseline to %s", d)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> XGBoostTextClassifier:
        import xgboost  # lazy: xgboost takes seconds to import; families.py registers every family at startup

        d = Path(directory)
        meta = read_saved_meta(d, (MODEL_FILE, VECTORIZERS_FILE, META_FILE), META_FILE, FORMAT_VERSION, "XGBoostTextClassifier")
        self = cls(XGBoostConfig(**meta["config"]))
        self.labels = list(meta["labels"])
        self.best_iteration = meta["best_iteration"]
        if meta.get("oos_threshold") is not None:  # files written before the one oos path (chatforge.oos)
            logger.warning("%s: the estimator's own oos_threshold %s is no longer applied; set the bundle's "
                           "oos policy instead (config oos.policy: threshold, oos.threshold: %s)",
                           d / META_FILE, meta["oos_threshold"], meta["oos_threshold"])
        self._features_ = TfidfFeatures.from_json(json.loads((d / VECTORIZERS_FILE).read_text(encoding="utf-8")))
        booster = xgboost.Booster()
        booster.load_model(str(d / MODEL_FILE))
        booster.set_param({"nthread": self.config.n_jobs})
        self._booster = booster
        return self


def build(cfg: XGBoostConfig, ctx: BuildContext) -> XGBoostTextClassifier:
    """Registry builder; labels come from the data at ``fit`` time, so ``ctx`` only checks the task."""
    return XGBoostTextClassifier(cfg)
