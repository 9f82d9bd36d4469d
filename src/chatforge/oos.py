"""Out-of-scope (OOS) handling for intent classifiers: Larson et al. 2019, "An Evaluation Dataset for
Intent Classification and Out-of-Scope Prediction" (EMNLP), section 4.

Three policies, chosen by the config's ``oos`` section:

* ``train``      oos is one more class, learnt from the data's oos examples (CLINC's ``oos_train``);
* ``threshold``  additionally answer oos when the best in-scope probability is below a threshold,
                 chosen on the validation split to maximise in-scope accuracy + OOS recall;
* ``binary``     a separate in-scope vs oos classifier (TF-IDF logistic regression, class-balanced)
                 decides first; the intent model only ever sees in-scope examples;
* ``scorer``     a logistic regression over the classifier's confidences (per kind of model in an
                 ensemble) and the text's TF-IDF similarity to the training examples of its intent,
                 fitted on validation, with a threshold on its P(oos) (``chatforge.oos_scorer``).

The chosen policy is stored in the bundle's ``metadata.json`` (``"oos"``) and, for ``binary``, the
detector's JSON/safetensors files in ``oos_detector/`` of the bundle (``scorer``: ``oos_scorer/``); :class:`OOSPolicy` applies it
wherever the bundle is served or evaluated, so both answer the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chatforge.evaluation.metrics import (
    DEFAULT_OOS_GRID,
    apply_oos_threshold,
    choose_oos_threshold,
    oos_metrics,
)

logger = logging.getLogger(__name__)

POLICIES = ("train", "threshold", "binary", "scorer")
DETECTOR_DIR = "oos_detector"
SCORER_DIR = "oos_scorer"
IN_SCOPE = "in_scope"


class OOSError(ValueError):
    """The data cannot support the requested out-of-scope policy."""


@dataclass
class OOSPolicy:
    """How a classifier's probabilities become (label, out_of_scope) answers (Larson et al. 2019, sec. 4).

    ``threshold`` (policy ``threshold``): predict ``label`` when the best in-scope probability is below it.
    ``detector`` (policy ``binary``): an estimator over labels ``[in_scope, <label>]``; the text is oos
    when its oos probability is at least ``detector_threshold``.
    ``scorer`` (policy ``scorer``): a :class:`chatforge.oos_scorer.OOSScorer`; the text is oos when its
    P(oos) is at least ``detector_threshold``. It reads ``views`` (the classifier's probabilities and
    its members'), so callers pass :meth:`chatforge.inference.Classifier.predict_views` to ``decide``.
    """

    policy: str = "train"
    label: str = "oos"
    threshold: float | None = None
    detector: Any = None
    detector_threshold: float = 0.5
    scorer: Any = None
    valid_metrics: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise OOSError(f"unknown oos policy {self.policy!r}; allowed: {', '.join(POLICIES)}")

    # -- applying ---------------------------------------------------------------------------------------

    def oos_probability(self, texts: Sequence[str]) -> np.ndarray | None:
        """The detector's P(oos) per text (policy ``binary``), else None."""
        if self.policy != "binary" or self.detector is None:
            return None
        col = self.detector.labels.index(self.label)
        return np.asarray(self.detector.predict_proba(list(texts)))[:, col]

    @property
    def needs_views(self) -> bool:
        """True when ``decide`` reads the members' probabilities too (policy ``scorer``)."""
        return self.policy == "scorer"

    def decide(self, probs: np.ndarray, labels: Sequence[str], texts: Sequence[str],
               views: Sequence[np.ndarray] | None = None) -> list[str]:
        """Final labels for ``probs`` (N, C) over ``labels``; ``self.label`` marks out-of-scope answers.

        ``views``: the classifier's probabilities per view (``views[0]`` is ``probs``; an ensemble adds
        one per kind of member), read by policy ``scorer``; default ``[probs]``.
        """
        probs = np.asarray(probs, dtype=np.float64)
        labels = list(labels)
        t = self.threshold if self.policy == "threshold" and self.threshold is not None else 0.0
        # apply_oos_threshold with t=0 is the plain argmax (an oos class stays oos).
        preds = apply_oos_threshold(probs, labels, t, self.label)
        if self.policy == "scorer" and self.scorer is not None:
            p_oos = self.scorer.oos_probability(list(views) if views is not None else [probs], labels, list(texts))
        else:
            p_oos = self.oos_probability(texts)
        if p_oos is not None:
            preds = [self.label if p >= self.detector_threshold else y for y, p in zip(preds, p_oos, strict=True)]
        return preds

    # -- persistence --------------------------------------------------------------------------------------

    def to_metadata(self) -> dict:
        meta: dict[str, Any] = {"policy": self.policy, "label": self.label, "threshold": self.threshold}
        if self.policy == "binary":
            meta.update(detector=DETECTOR_DIR, detector_threshold=self.detector_threshold)
        elif self.policy == "scorer":
            meta.update(scorer=SCORER_DIR, detector_threshold=self.detector_threshold)
        if self.valid_metrics:
            meta["valid"] = self.valid_metrics
        return meta

    @classmethod
    def from_metadata(cls, meta: dict | None, bundle_dir: str | Path | None = None) -> OOSPolicy:
        """Rebuild the policy stored in a bundle's metadata (default: oos-train with label ``oos``)."""
        if not meta:
            return cls()
        policy = cls(policy=meta.get("policy", "train"), label=meta.get("label", "oos"),
                     threshold=meta.get("threshold"), detector_threshold=meta.get("detector_threshold", 0.5),
                     valid_metrics=meta.get("valid", {}))
        if policy.policy == "binary":
            from chatforge.baselines.linear import LinearTextClassifier

            if bundle_dir is None:
                raise OOSError("an oos-binary policy needs the bundle folder to load its detector from")
            policy.detector = LinearTextClassifier.load(Path(bundle_dir) / meta.get("detector", DETECTOR_DIR))
        elif policy.policy == "scorer":
            from chatforge.oos_scorer import OOSScorer

            if bundle_dir is None:
                raise OOSError("an oos-scorer policy needs the bundle folder to load its scorer from")
            policy.scorer = OOSScorer.load(Path(bundle_dir) / meta.get("scorer", SCORER_DIR))
        return policy

    def extra_dirs(self) -> dict[str, Any] | None:
        """Bundle subfolders this policy saves (``save_bundle(extra_dirs=...)``)."""
        if self.policy == "binary" and self.detector is not None:
            return {DETECTOR_DIR: self.detector}
        if self.policy == "scorer" and self.scorer is not None:
            return {SCORER_DIR: self.scorer}
        return None


# -- fitting ----------------------------------------------------------------------------------------------


def in_scope_only(examples: Sequence, label: str) -> list:
    """Examples (anything with ``.label``) whose label is not ``label``."""
    return [e for e in examples if e.label != label]


def _require_both(y: Sequence[str], label: str, what: str, policy: str) -> None:
    n_oos = sum(1 for v in y if v == label)
    if n_oos == 0 or n_oos == len(y):
        raise OOSError(
            f"oos.policy={policy} needs {what} with both in-scope examples and examples labelled {label!r} "
            f"(found {n_oos} {label!r} of {len(y)}); for CLINC150 use data.train_keys [train, oos_train] "
            f"and data.valid_keys [val, oos_val], or set oos.policy: train"
        )


def fit_binary_detector(texts: Sequence[str], labels: Sequence[str], label: str = "oos", seed: int = 0):
    """A class-balanced TF-IDF logistic regression over ``[in_scope, label]`` (Larson's oos-binary)."""
    from chatforge.baselines.linear import LinearConfig, LinearTextClassifier

    y = [label if v == label else IN_SCOPE for v in labels]
    _require_both(y, label, "training data", "binary")
    # Balanced: CLINC has 100 oos against 15,000 in-scope training examples.
    return LinearTextClassifier(LinearConfig(C=10.0, class_weight="balanced", seed=seed)).fit(list(texts), y)


def _as_arrays(main_preds, p_oos, y_true) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray([str(v) for v in y_true], dtype=object)
    main = np.asarray([str(v) for v in main_preds], dtype=object)
    p = np.asarray(p_oos, dtype=np.float64)
    if not len(y) == len(main) == len(p):
        raise ValueError(f"main_preds ({len(main)}), p_oos ({len(p)}) and y_true ({len(y)}) differ in length")
    return y, main, p


def _flag_counts(main: np.ndarray, p: np.ndarray, y: np.ndarray, label: str,
                 cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """In-scope accuracy and OOS recall when ``p >= t`` flags ``label``, for every ``t`` in ``cand``
    (sorted counts, no loop), and the in-scope accuracy of ``main`` alone."""
    is_oos = y == label
    n_in, n_oos = int((~is_oos).sum()), int(is_oos.sum())
    # in-scope examples right before flagging stay right when p < t; oos misses become hits when p >= t
    right = np.sort(p[~is_oos & (main == y)])
    misses = np.sort(p[is_oos & (main != label)])
    already = int((is_oos & (main == label)).sum())
    acc = np.searchsorted(right, cand, side="left") / n_in if n_in else np.zeros(len(cand))
    rec = (already + len(misses) - np.searchsorted(misses, cand, side="left")) / n_oos if n_oos else np.zeros(len(cand))
    return acc, rec, (len(right) / n_in if n_in else 0.0)


def oos_tradeoff(main_preds: Sequence[str], p_oos: np.ndarray, y_true: Sequence[str],
                 label: str = "oos") -> tuple[np.ndarray, np.ndarray]:
    """(in-scope accuracy, OOS recall) at every threshold on ``p_oos``, from flagging nothing to
    flagging everything: the curve a threshold moves along (plotted by ``oos_tradeoff_png``)."""
    y, main, p = _as_arrays(main_preds, p_oos, y_true)
    cand = np.append(np.unique(p), np.inf)[::-1]
    acc, rec, _ = _flag_counts(main, p, y, label, cand)
    return acc, rec


def choose_flag_threshold(main_preds: Sequence[str], p_oos: np.ndarray, y_true: Sequence[str], label: str,
                          grid: Sequence[float] | None = None, max_in_scope_drop: float | None = None,
                          prefer: float = 0.5) -> tuple[float, dict]:
    """The threshold on ``p_oos`` (answer ``label`` when ``p_oos >= t``, else ``main_preds``) that
    maximises in-scope accuracy + OOS recall on validation.

    ``grid``: candidate thresholds (default: every distinct ``p_oos`` value, i.e. an exact search, plus
    one above them all = flag nothing). ``max_in_scope_drop``: only thresholds losing at most this
    much in-scope accuracy against ``main_preds`` are candidates. Ties go to the threshold nearest
    ``prefer``. Vectorised (sorted counts), so a 3,000-point exact search takes milliseconds.
    """
    y, main, p = _as_arrays(main_preds, p_oos, y_true)
    cand = np.unique(p) if grid is None else np.asarray(sorted(float(g) for g in grid), dtype=np.float64)
    if grid is None:
        cand = np.append(cand, np.nextafter(cand[-1], np.inf) if len(cand) else 1.0)
    if not len(cand):
        raise ValueError("grid must contain at least one threshold")
    acc, rec, base = _flag_counts(main, p, y, label, cand)
    score = acc + rec
    ok = np.ones(len(cand), dtype=bool)
    if max_in_scope_drop is not None:
        ok = acc >= base - max_in_scope_drop - 1e-12
    if not ok.any():  # nothing within the bound: the highest threshold, the least flagging
        ok = cand == cand.max()
    key = np.where(ok, score, -np.inf)
    top = np.flatnonzero(key >= key.max() - 1e-12)
    t = float(cand[top[np.argmin(np.abs(cand[top] - prefer))]])
    preds = [label if q >= t else m for m, q in zip(main, p, strict=True)]
    m = oos_metrics(list(y), preds, label)
    return t, {**m, "criterion": (m["in_scope_accuracy"] or 0.0) + (m["oos_recall"] or 0.0)}


def choose_detector_threshold(main_preds: Sequence[str], p_oos: np.ndarray, y_true: Sequence[str], label: str,
                              grid: Sequence[float] = DEFAULT_OOS_GRID) -> tuple[float, dict]:
    """The detector threshold maximising in-scope accuracy + OOS recall on validation (ties: 0.5 side)."""
    return choose_flag_threshold(main_preds, p_oos, y_true, label, grid=grid, prefer=0.5)


def fit_scorer(views: Sequence[np.ndarray], labels: Sequence[str], valid_texts: Sequence[str],
               valid_labels: Sequence[str], train_texts: Sequence[str], train_labels: Sequence[str],
               label: str = "oos", max_in_scope_drop: float | None = None, threshold: float | None = None):
    """Fit an :class:`~chatforge.oos_scorer.OOSScorer` on validation ``views`` and choose its threshold.

    Returns ``(scorer, threshold, validation metrics)``; ``threshold`` given: used as it is.
    """
    from chatforge.oos_scorer import OOSScorer

    valid_labels = [str(v) for v in valid_labels]
    _require_both(valid_labels, label, "a validation split", "scorer")
    scorer = OOSScorer(label=label).fit_neighbours(train_texts, train_labels)
    feats = scorer.features(views, labels, valid_texts)
    scorer.fit(feats, [v == label for v in valid_labels])
    p = scorer.score(feats)
    main = apply_oos_threshold(np.asarray(views[0]), list(labels), 0.0, label)
    if threshold is not None:
        preds = [label if q >= threshold else m for m, q in zip(main, p, strict=True)]
        return scorer, float(threshold), oos_metrics(valid_labels, preds, label)
    t, m = choose_flag_threshold(main, p, valid_labels, label, max_in_scope_drop=max_in_scope_drop, prefer=1.0)
    return scorer, t, m


def fit_policy(cfg_oos, predict_proba: Callable[[list[str]], np.ndarray], labels: Sequence[str],
               valid_texts: Sequence[str], valid_labels: Sequence[str],
               train_texts: Sequence[str] = (), train_labels: Sequence[str] = (), seed: int = 0,
               predict_views: Callable[[list[str]], list[np.ndarray]] | None = None) -> OOSPolicy:
    """Build the policy the config's ``oos`` section asks for, fitting what it needs.

    ``predict_proba`` scores texts with the trained intent model (columns in ``labels`` order);
    ``train_*`` are the full training data (with oos examples: the binary detector learns from them);
    ``predict_views`` (policy ``scorer``): the model's probabilities per view, default ``[predict_proba]``.
    """
    policy = OOSPolicy(policy=cfg_oos.policy, label=cfg_oos.label, threshold=cfg_oos.threshold)
    if policy.policy == "train":
        return policy
    valid_texts, valid_labels = list(valid_texts), [str(v) for v in valid_labels]
    if policy.policy == "scorer":
        views = predict_views(valid_texts) if predict_views is not None else [predict_proba(valid_texts)]
        policy.scorer, policy.detector_threshold, policy.valid_metrics = fit_scorer(
            views, labels, valid_texts, valid_labels, train_texts, train_labels, policy.label,
            max_in_scope_drop=getattr(cfg_oos, "max_in_scope_drop", None), threshold=cfg_oos.threshold)
        policy.threshold = None
        logger.info("oos-scorer: P(oos) threshold %.4f over %d view(s)", policy.detector_threshold, len(views))
        return policy
    if policy.policy == "threshold":
        if policy.threshold is None:
            _require_both(valid_labels, policy.label, "a validation split", "threshold")
            t, m = choose_oos_threshold(predict_proba(valid_texts), valid_labels, list(labels), policy.label,
                                        max_in_scope_drop=getattr(cfg_oos, "max_in_scope_drop", None))
            policy.threshold, policy.valid_metrics = t, m
        logger.info("oos-threshold: %.2f", policy.threshold)
        return policy
    policy.detector = fit_binary_detector(train_texts, train_labels, policy.label, seed)
    if cfg_oos.threshold is not None:
        policy.detector_threshold = cfg_oos.threshold
        policy.threshold = None
    elif valid_texts and any(v == policy.label for v in valid_labels):
        main = apply_oos_threshold(predict_proba(valid_texts), list(labels), 0.0, policy.label)
        p_oos = policy.oos_probability(valid_texts)
        policy.detector_threshold, policy.valid_metrics = choose_detector_threshold(
            main, p_oos, valid_labels, policy.label)
    logger.info("oos-binary: detector threshold %.2f", policy.detector_threshold)
    return policy
