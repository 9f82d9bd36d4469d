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
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chatforge.baselines.linear import LinearConfig, LinearTextClassifier
from chatforge.oos_scorer import OOSScorer

logger = logging.getLogger(__name__)

POLICIES = ("train", "threshold", "binary", "scorer")
DETECTOR_DIR = "oos_detector"
SCORER_DIR = "oos_scorer"
IN_SCOPE = "in_scope"
# The version of a policy's decision rule as stored in metadata.json: bumped when the same metadata would
# decide differently, so a served answer can be traced to the rule that made it (ListModels shows it).
POLICY_VERSION = 1


DEFAULT_OOS_GRID: tuple[float, ...] = tuple(round(i / 100, 2) for i in range(100))


def _check_same_length(a: Sequence, b: Sequence, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}")


# -- metrics and the threshold rule (Larson et al. 2019, section 4) ---------------------------------------


def oos_metrics(y_true: Sequence[str], y_pred: Sequence[str], oos_label: str = "oos") -> dict:
    """In-scope accuracy, out-of-scope recall and precision (Larson et al. 2019, section 4).

    * ``in_scope_accuracy``: accuracy over the examples whose *true* label is in-scope
      (predicting ``oos`` for them counts as wrong);
    * ``oos_recall``: fraction of true-oos examples predicted ``oos``;
    * ``oos_precision``: fraction of ``oos`` predictions that are truly oos.
    """
    _check_same_length(y_true, y_pred, "y_true", "y_pred")
    n_in = n_in_correct = n_oos = n_oos_hit = n_pred_oos = 0
    for t, p in zip(y_true, y_pred, strict=True):
        if p == oos_label:
            n_pred_oos += 1
        if t == oos_label:
            n_oos += 1
            n_oos_hit += p == oos_label
        else:
            n_in += 1
            n_in_correct += p == t
    return {
        "in_scope_accuracy": n_in_correct / n_in if n_in else None,
        "oos_recall": n_oos_hit / n_oos if n_oos else None,
        "oos_precision": n_oos_hit / n_pred_oos if n_pred_oos else None,
        "n_in_scope": n_in,
        "n_oos": n_oos,
        "n_pred_oos": n_pred_oos,
    }


def apply_oos_threshold(
    probs: np.ndarray, labels: Sequence[str], threshold: float, oos_label: str = "oos"
) -> list[str]:
    """Argmax prediction, replaced by ``oos_label`` when the best in-scope probability < ``threshold``.

    ``labels`` names the columns of ``probs``; it may or may not contain ``oos_label`` (a model
    trained with Larson's ``oos_train`` has an oos class). If the argmax already is ``oos`` it
    stays ``oos``; otherwise the argmax *is* the best in-scope class, so comparing its probability
    with the threshold is the rule "predict oos when max in-scope probability < threshold".
    ``threshold=0`` therefore leaves the argmax unchanged.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"probs must have shape (N, {len(labels)}) to match labels, got {probs.shape}")
    best = probs.argmax(axis=1)
    best_p = probs[np.arange(len(probs)), best]
    out = []
    for b, p in zip(best, best_p, strict=True):
        label = labels[int(b)]
        out.append(oos_label if label == oos_label or p < threshold else label)
    return out


def choose_oos_threshold(
    probs: np.ndarray,
    y_true: Sequence[str],
    labels: Sequence[str],
    oos_label: str = "oos",
    grid: Sequence[float] = DEFAULT_OOS_GRID,
    max_in_scope_drop: float | None = None,
) -> tuple[float, dict]:
    """Pick the oos probability threshold on a validation set.

    Criterion: maximise ``in_scope_accuracy + oos_recall`` (the two numbers Larson et al. report
    side by side, weighted equally, so the threshold cannot buy recall with unbounded accuracy
    loss or vice versa). Ties go to the smallest threshold, i.e. the least intervention.

    ``max_in_scope_drop`` (e.g. 0.005): only thresholds whose in-scope accuracy is at most this
    far below the model's own (no threshold) are candidates. With 100 oos against 3,000 in-scope
    validation examples, the equal-weight criterion happily trades 7 points of accuracy for 50 of
    recall; a product usually cannot, and this bound says how much accuracy recall may cost.
    Returns ``(threshold, oos_metrics at that threshold + {"criterion": value})``.
    """
    _check_same_length(probs, y_true, "probs", "y_true")
    if oos_label not in set(y_true) or all(t == oos_label for t in y_true):
        raise ValueError(
            f"choose_oos_threshold needs both in-scope and {oos_label!r} examples in y_true to choose a threshold"
        )
    if not grid:
        raise ValueError("grid must contain at least one threshold")
    if max_in_scope_drop is not None and not 0.0 <= max_in_scope_drop <= 1.0:
        raise ValueError(f"max_in_scope_drop must be in [0, 1] (an accuracy fraction), got {max_in_scope_drop}")
    floor = -math.inf
    if max_in_scope_drop is not None:
        base = oos_metrics(y_true, apply_oos_threshold(probs, labels, 0.0, oos_label), oos_label)
        floor = base["in_scope_accuracy"] - max_in_scope_drop - 1e-12
    best_t, best_score, best_m = 0.0, -math.inf, {}
    for t in sorted(float(g) for g in grid):
        m = oos_metrics(y_true, apply_oos_threshold(probs, labels, t, oos_label), oos_label)
        if m["in_scope_accuracy"] < floor:
            continue
        score = m["in_scope_accuracy"] + m["oos_recall"]
        if score > best_score + 1e-12:
            best_t, best_score, best_m = t, score, m
    if not best_m:  # every grid point drops too much accuracy: no threshold at all
        best_m = oos_metrics(y_true, apply_oos_threshold(probs, labels, 0.0, oos_label), oos_label)
        best_score = best_m["in_scope_accuracy"] + best_m["oos_recall"]
    logger.info("chose oos threshold %.3f (in-scope acc + oos recall = %.4f)", best_t, best_score)
    return best_t, {**best_m, "criterion": best_score}


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
        meta: dict[str, Any] = {"policy": self.policy, "version": POLICY_VERSION, "label": self.label,
                                "threshold": self.threshold}
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
            if bundle_dir is None:
                raise OOSError("an oos-binary policy needs the bundle folder to load its detector from")
            policy.detector = LinearTextClassifier.load(Path(bundle_dir) / meta.get("detector", DETECTOR_DIR))
        elif policy.policy == "scorer":
            if bundle_dir is None:
                raise OOSError("an oos-scorer policy needs the bundle folder to load its scorer from")
            policy.scorer = OOSScorer.load(Path(bundle_dir) / meta.get("scorer", SCORER_DIR))
        return policy

    def serving_metadata(self) -> dict[str, str]:
        """Flat ``oos_*`` entries for ListModels: the policy a Classify answer went through, its rule's
        version and the threshold it applies (on the best in-scope probability for ``threshold``, on the
        detector's or scorer's P(oos) for ``binary`` / ``scorer``; none for ``train``)."""
        meta = {"oos_policy": self.policy, "oos_policy_version": str(POLICY_VERSION), "oos_label": self.label}
        if self.policy == "threshold" and self.threshold is not None:
            meta["oos_threshold"] = repr(float(self.threshold))
        elif self.policy in ("binary", "scorer"):
            meta["oos_threshold"] = repr(float(self.detector_threshold))
        return meta

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
