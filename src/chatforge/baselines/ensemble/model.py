"""Ensembles of trained classifier bundles, servable as one bundle (family ``ensemble``).

``average``: weighted probability averaging (Dietterich 2000, "Ensemble Methods in Machine
Learning", section 2). ``geometric``: the weighted geometric mean of the members' probabilities,
renormalised (log-linear pooling, a product of experts: Hinton 2002; what neural machine translation
ensembles do when they average log-probabilities): a class one member finds very unlikely stays
unlikely however sure another member is, where the arithmetic mean lets the most confident member
decide. ``stacking``: a multinomial logistic-regression meta-learner over the
members' concatenated probabilities, fitted on the validation split, which the members never
trained on (Wolpert 1992, "Stacked Generalization"; Ting & Witten 1999 for probabilities as the
level-1 features).

The ensemble bundle copies its members into ``members/<i>/`` so it is self-contained; its own
weights (averaging weights or the meta-learner's coefficients) are JSON. Members may be any
classification bundle, torch or estimator; their label sets must agree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chatforge.baselines.ensemble.config import EnsembleConfig
from chatforge.baselines.tfidf import check_texts
from chatforge.fileio import atomic_write_json
from chatforge.registry import BuildContext

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENSEMBLE_FILE = "ensemble.json"
MEMBERS_DIR = "members"
# Geometric pooling takes logs: a member's probability is floored here first, so a class one member gives
# exactly 0 (float32 underflow) is strongly vetoed rather than turning the product into NaN.
GEOMETRIC_FLOOR = 1e-12


class EnsembleError(ValueError):
    pass


def pool(probs: Sequence[np.ndarray], weights: Sequence[float], method: str) -> np.ndarray:
    """The weighted pool of (N, C) probability arrays, rows summing to 1: the arithmetic mean
    (``average``) or the renormalised geometric mean (``geometric``). ``weights`` sum to 1."""
    if method == "geometric":
        z = sum(w * np.log(np.clip(p, GEOMETRIC_FLOOR, None)) for w, p in zip(weights, probs, strict=True))
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)
    if method == "average":
        return sum(w * p for w, p in zip(weights, probs, strict=True))
    raise ValueError(f"pool: method must be 'average' or 'geometric', got {method!r}")


def resolve_member(path: str | os.PathLike) -> Path:
    """A bundle folder, accepting a run folder (``<run>/bundle``) too."""
    p = Path(path)
    return p / "bundle" if (p / "bundle").is_dir() else p


def check_label_sets(members: Sequence[Any], names: Sequence[str]) -> list[str]:
    """The members' common label set (sorted), or an EnsembleError naming the differences."""
    ref = set(members[0].labels)
    for m, name in zip(members[1:], names[1:], strict=True):
        got = set(m.labels)
        if got != ref:
            raise EnsembleError(
                f"ensemble members' label sets must agree: {name} differs from {names[0]} "
                f"(only in {name}: {sorted(got - ref)[:10]}; only in {names[0]}: {sorted(ref - got)[:10]})"
            )
    return sorted(ref)


class EnsembleClassifier:
    """Weighted arithmetic or geometric pooling, or logistic-regression stacking, over member classifiers.

    A member is anything with ``labels`` and ``predict_proba(texts)`` (a loaded classification bundle,
    :class:`chatforge.bundle.Bundle`); columns are re-ordered to the ensemble's sorted labels.
    ``load_member`` (``BuildContext.load_classifier``, given by whoever loads or trains bundles) turns a
    member's bundle folder into one, so this family imports nothing above the registry.
    """

    def __init__(self, config: EnsembleConfig, load_member: Callable[[Path], Any] | None = None) -> None:
        self.config = config
        self.load_member = load_member
        self.members: list[Any] = []
        self.member_paths: list[Path] = []
        self.labels: list[str] = []
        self.weights: list[float] = []
        self.meta: dict | None = None  # stacking: {"classes", "coef", "intercept"}

    def _load_member(self, path: Path) -> Any:
        if self.load_member is None:
            raise EnsembleError("this ensemble was built without a member loader (BuildContext.load_classifier); "
                                "build it through chatforge.bundle (load_bundle, build_from_config)")
        return self.load_member(path)

    @classmethod
    def from_members(cls, members: Sequence[Any], config: EnsembleConfig,
                     paths: Sequence[str | os.PathLike] | None = None) -> EnsembleClassifier:
        """An ensemble over already-loaded members (``paths``: their bundle folders, needed by ``save``)."""
        self = cls(config)
        self.members = list(members)
        self.member_paths = [Path(p) for p in (paths or [])]
        names = [str(p) for p in self.member_paths] or [f"member {i}" for i in range(len(self.members))]
        self.labels = check_label_sets(self.members, names)
        w = config.weights or [1.0] * len(self.members)
        self.weights = [float(x) / sum(w) for x in w]
        return self

    def _member_probs(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for m in self.members:
            p = np.asarray(m.predict_proba(texts), dtype=np.float64)
            col = {label: i for i, label in enumerate(m.labels)}
            out.append(p[:, [col[label] for label in self.labels]])  # (N, C) in ensemble label order
        return out

    def fit(self, texts: Sequence[str], labels: Sequence[str], valid_texts: Sequence[str] | None = None,
            valid_labels: Sequence[str] | None = None) -> EnsembleClassifier:
        """Load the configured members; stacking fits its meta-learner on the validation data.

        The training split is not used: the members were trained on it, so their probabilities
        there are over-confident and would teach the meta-learner to trust them blindly.
        """
        if not self.members:
            paths = [resolve_member(p) for p in self.config.members]
            missing = [str(p) for p in paths if not p.is_dir()]
            if missing:
                raise EnsembleError(f"model.members: bundle folder(s) not found: {', '.join(missing)}")
            loaded = EnsembleClassifier.from_members([self._load_member(p) for p in paths], self.config, paths)
            self.members, self.member_paths = loaded.members, loaded.member_paths
            self.labels, self.weights = loaded.labels, loaded.weights
        if self.config.method == "stacking":
            if not valid_texts:
                raise EnsembleError("method 'stacking' fits its meta-learner on the validation split, which is "
                                    "empty; set data.valid_fraction > 0 (or data.valid_keys) or use 'average'")
            self.fit_meta(check_texts(valid_texts, "valid_texts"), [str(v) for v in valid_labels])
        return self

    def fit_meta(self, texts: list[str], labels: list[str]) -> None:
        # lazy: scikit-learn takes seconds to import; families.py registers every family at startup
        from sklearn.linear_model import LogisticRegression

        unknown = sorted(set(labels) - set(self.labels))
        if unknown:
            raise EnsembleError(f"validation labels {unknown[:10]} are not among the members' labels")
        x = np.concatenate(self._member_probs(texts), axis=1)  # (N, M*C)
        clf = LogisticRegression(C=self.config.C, max_iter=self.config.max_iter).fit(x, labels)
        coef, intercept = clf.coef_, clf.intercept_
        if coef.shape[0] == 1:  # two classes: scikit-learn keeps the second class's row only
            coef, intercept = np.vstack([-coef, coef]) / 2, np.array([-intercept[0], intercept[0]]) / 2
        self.meta = {"classes": [str(c) for c in clf.classes_], "coef": coef.tolist(),
                     "intercept": intercept.tolist()}
        logger.info("stacking meta-learner fitted on %d validation examples", len(texts))

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(N, C) probabilities, columns in ``self.labels`` order."""
        texts = check_texts(texts, "texts")
        if not self.members:
            raise RuntimeError("EnsembleClassifier has no members; call fit() or load() first")
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self._combine(self._member_probs(texts))

    def _combine(self, probs: list[np.ndarray]) -> np.ndarray:
        """The ensemble's (N, C) probabilities from its members' (pooled, or through the meta-learner)."""
        if self.config.method in ("average", "geometric"):
            return pool(probs, self.weights, self.config.method).astype(np.float32)
        if self.meta is None:
            raise RuntimeError("stacking ensemble has no meta-learner; call fit() with validation data")
        z = np.concatenate(probs, axis=1) @ np.asarray(self.meta["coef"]).T + np.asarray(self.meta["intercept"])
        z = np.exp(z - z.max(axis=1, keepdims=True))
        z /= z.sum(axis=1, keepdims=True)
        out = np.zeros((len(z), len(self.labels)), dtype=np.float32)
        col = {label: i for i, label in enumerate(self.labels)}
        out[:, [col[c] for c in self.meta["classes"]]] = z  # labels absent from validation get 0
        return out

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.labels[i] for i in self.predict_proba(texts).argmax(axis=1)]

    def member_kinds(self) -> list[str]:
        """Each member's model family (``linear``, ``transformer``, ...): what ``predict_views`` groups by."""
        return [str(getattr(m, "family", None) or getattr(getattr(m, "info", None), "family", None)
                    or type(m).__name__) for m in self.members]

    def predict_views(self, texts: Sequence[str]) -> list[np.ndarray]:
        """The ensemble's probabilities, then one (N, C) view per kind of member when there are two or more
        kinds: that kind's members pooled as the ensemble pools (weighted arithmetic or geometric mean;
        seeds of one model agree on how sure to be, so one view per kind, not per member). The oos scorer
        (``chatforge.oos_scorer``) reads these."""
        texts = check_texts(texts, "texts")
        kinds = self.member_kinds()
        if len(set(kinds)) < 2 or not texts:
            return [self.predict_proba(texts).astype(np.float64)]
        probs = self._member_probs(texts)  # once: the combined view and the per-kind views share them
        combined = self._combine(probs).astype(np.float64)
        pooled = self.config.method in ("average", "geometric")
        weights = self.weights if pooled else [1.0] * len(probs)
        method = self.config.method if pooled else "average"
        views = [combined]
        for kind in dict.fromkeys(kinds):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            w = [weights[i] for i in idx]
            if sum(w) <= 0:  # a kind weighted out of the average still says how sure it is: equal weights
                w = [1.0] * len(idx)
            views.append(pool([probs[i] for i in idx], [wi / sum(w) for wi in w], method))
        return views

    def serving_metadata(self) -> dict[str, str]:
        """Flat ``ensemble_*`` entries for ListModels: how the members are pooled, and their families in order."""
        return {"ensemble_method": self.config.method, "ensemble_members": ",".join(self.member_kinds())}

    def save(self, directory: str | os.PathLike) -> Path:
        """Copy the member bundles into ``members/<i>/`` and write ``ensemble.json``."""
        d = Path(directory)
        if len(self.member_paths) != len(self.members):
            raise RuntimeError("save needs the members' bundle folders (build with from_members(..., paths=...))")
        for i, src in enumerate(self.member_paths):
            dst = d / MEMBERS_DIR / str(i)
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
        atomic_write_json(d / ENSEMBLE_FILE, {
            "format_version": FORMAT_VERSION, "config": dataclasses.asdict(self.config), "labels": self.labels,
            "weights": self.weights, "meta": self.meta,
            "member_sources": [str(p) for p in self.member_paths],
        })
        return d

    def load(self, directory: str | os.PathLike) -> EnsembleClassifier:
        """The ensemble saved in ``directory`` (members from its ``members/`` copies, through this one's loader)."""
        d = Path(directory)
        if not (d / ENSEMBLE_FILE).is_file():
            raise FileNotFoundError(f"{d} is not a saved ensemble: missing {ENSEMBLE_FILE}")
        state = json.loads((d / ENSEMBLE_FILE).read_text(encoding="utf-8"))
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported {ENSEMBLE_FILE} format_version {state.get('format_version')!r}; "
                             f"this chatforge reads version {FORMAT_VERSION}")
        config = EnsembleConfig(**state["config"])
        paths = [d / MEMBERS_DIR / str(i) for i in range(len(config.members))]
        loaded = EnsembleClassifier.from_members([self._load_member(p) for p in paths], config, paths)
        if loaded.labels != state["labels"]:
            raise EnsembleError(f"{d}: members' labels do not match {ENSEMBLE_FILE}")
        loaded.load_member = self.load_member
        loaded.weights, loaded.meta = state["weights"], state["meta"]
        return loaded


def build(cfg: EnsembleConfig, ctx: BuildContext) -> EnsembleClassifier:
    """Registry builder; members are loaded at ``fit`` (training) or ``load`` (from the bundle) through
    ``ctx.load_classifier``."""
    return EnsembleClassifier(cfg, ctx.load_classifier)
