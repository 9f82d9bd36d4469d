"""TF-IDF word + character n-gram features shared by the estimator baselines.

Saved as JSON (parameters, vocabulary, idf), never pickled; float64 idf values round-trip
exactly through JSON, so reloaded features are bit-identical.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

NAMES = ("word", "char")


@dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class TfidfConfig:
    """The TF-IDF keys every TF-IDF baseline shares (word 1..``word_ngram_max``-grams, char_wb
    ``char_ngram_min``..``char_ngram_max``-grams); a baseline's config extends it with its own keys.
    ``max_features`` caps each vocabulary (word and char separately; None: no cap)."""

    word_ngram_max: int = Field(2, ge=1, le=5)
    char_ngram_min: int = Field(2, ge=1, le=10)
    char_ngram_max: int = Field(5, ge=1, le=10)
    max_features: int | None = Field(None, ge=1)
    min_df: int = Field(1, ge=1)
    sublinear_tf: bool = True
    lowercase: bool = True

    @model_validator(mode="after")
    def _check_char_range(self):
        if self.char_ngram_min > self.char_ngram_max:
            raise ValueError(
                f"char_ngram_min ({self.char_ngram_min}) must be <= char_ngram_max ({self.char_ngram_max})"
            )
        return self


def check_texts(texts: Sequence[str], what: str) -> list[str]:
    """A list of strings in Unicode NFC, or a TypeError naming what was wrong (a lone string is a common slip).

    NFC because these models compare characters: Hangul typed or copied on some systems arrives decomposed (NFD:
    "결" as the three letters ㄱ ㅕ ㄹ), which shares no character n-gram with the same word composed, so a
    TF-IDF or ranker model answered every such message with one unrelated reply. The tokenizers' encode does the
    same for the neural families."""
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a sequence of strings, not a single string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{what} must contain only strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return [t if unicodedata.is_normalized("NFC", t) else unicodedata.normalize("NFC", t) for t in texts]


def read_saved_meta(directory: Path, files: Sequence[str], meta_file: str, version: int, what: str) -> dict:
    """Check a saved estimator folder has ``files`` and a readable ``meta_file`` of ``version``."""
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a saved {what}: missing {', '.join(missing)}")
    meta = json.loads((directory / meta_file).read_text(encoding="utf-8"))
    if meta.get("format_version") != version:
        raise ValueError(f"unsupported {meta_file} format_version {meta.get('format_version')!r}; "
                         f"this chatforge reads version {version}")
    return meta


def vectorizer_kwargs(cfg: TfidfConfig) -> dict[str, dict]:
    """scikit-learn TfidfVectorizer arguments for the word and char_wb vectorizers of ``cfg``."""
    common = {"min_df": cfg.min_df, "max_features": cfg.max_features, "sublinear_tf": cfg.sublinear_tf,
              "lowercase": cfg.lowercase}
    return {
        "word": {**common, "analyzer": "word", "ngram_range": [1, cfg.word_ngram_max]},
        "char": {**common, "analyzer": "char_wb", "ngram_range": [cfg.char_ngram_min, cfg.char_ngram_max]},
    }


def _make(kwargs: dict, vocabulary: dict[str, int] | None = None):
    # lazy: scikit-learn takes seconds to import; families.py registers every family at startup
    from sklearn.feature_extraction.text import TfidfVectorizer

    kw = {k: v for k, v in kwargs.items() if k != "dtype"}  # always float32 features
    kw["ngram_range"] = tuple(kw["ngram_range"])
    return TfidfVectorizer(vocabulary=vocabulary, dtype=np.float32, **kw)


class TfidfFeatures:
    """Word + char_wb TF-IDF, concatenated into one sparse float32 matrix."""

    def __init__(self, kwargs: dict[str, dict]):
        self.kwargs = kwargs
        self.vectorizers = {name: _make(kwargs[name]) for name in NAMES}

    @classmethod
    def from_config(cls, cfg: Any) -> TfidfFeatures:
        return cls(vectorizer_kwargs(cfg))

    def fit_transform(self, texts: Sequence[str]):
        # scipy (with scikit-learn) is in the `train` extra only; the serving image registers every family at
        # startup without it, so it is imported where features are built, as scikit-learn is above.
        import scipy.sparse as sp

        return sp.hstack([self.vectorizers[n].fit_transform(texts) for n in NAMES], format="csr",
                         dtype=np.float32)

    def transform(self, texts: Sequence[str]):
        import scipy.sparse as sp  # train extra only: see fit_transform

        return sp.hstack([self.vectorizers[n].transform(texts) for n in NAMES], format="csr", dtype=np.float32)

    @property
    def n_features(self) -> int:
        return sum(len(v.vocabulary_) for v in self.vectorizers.values())

    def to_json(self) -> dict:
        return {name: {"kwargs": self.kwargs[name],
                       "vocabulary": {t: int(i) for t, i in vec.vocabulary_.items()},
                       "idf": [float(v) for v in vec.idf_]}
                for name, vec in self.vectorizers.items()}

    @classmethod
    def from_json(cls, doc: dict) -> TfidfFeatures:
        self = cls.__new__(cls)
        self.kwargs = {name: doc[name]["kwargs"] for name in NAMES}
        self.vectorizers = {}
        for name in NAMES:
            vec = _make(doc[name]["kwargs"], vocabulary=doc[name]["vocabulary"])
            vec.idf_ = np.asarray(doc[name]["idf"], dtype=np.float64)
            self.vectorizers[name] = vec
        return self


class TfidfTextClassifier:
    """What the TF-IDF estimators share: their features, the fitted check, and ``predict_proba``/``predict`` around
    a subclass's ``_proba(features)`` (columns in ``self.labels`` order). Subclasses set ``self._features_`` when
    fitted or loaded and say in ``_is_fitted`` whether their own weights are there."""

    labels: list[str]
    _features_: TfidfFeatures | None

    def _is_fitted(self) -> bool:
        raise NotImplementedError

    def _proba(self, features) -> np.ndarray:
        raise NotImplementedError

    def _features(self, texts: Sequence[str]):
        return self._features_.transform(texts)

    def _require_fitted(self) -> None:
        if not self._is_fitted():
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() or load() first")

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(N, C) probabilities, columns in ``self.labels`` order."""
        self._require_fitted()
        texts = check_texts(texts, "texts")
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self._proba(self._features(texts))

    def predict(self, texts: Sequence[str]) -> list[str]:
        """Arg-max labels. Out-of-scope answers come from the bundle's oos policy (chatforge.oos), applied
        by ``chatforge.inference.Classifier`` for every family alike, not from the estimator."""
        return [self.labels[i] for i in self.predict_proba(texts).argmax(axis=1)]
