"""Out-of-scope (OOS) handling for intent classifiers: Larson et al. 2019, "An Evaluation Dataset for
Intent Classification and Out-of-Scope Prediction" (EMNLP), section 4.

Three policies, chosen by the config's ``oos`` section:

* ``train``      oos is one more class, learnt from the data's oos examples (CLINC's ``oos_train``);
* ``threshold``  additionally answer oos when the best in-scope probability is below a threshold,
                 chosen on the validation split to maximise in-scope accuracy + OOS recall;
* ``binary``     a separate in-scope vs oos classifier (TF-IDF logistic regression, class-balanced)
                 decides first; the intent model only ever sees in-scope examples.

The chosen policy is stored in the bundle's ``metadata.json`` (``"oos"``) and, for ``binary``, the
detector's JSON/safetensors files in ``oos_detector/`` of the bundle; :class:`OOSPolicy` applies it
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

POLICIES = ("train", "threshold", "binary")
DETECTOR_DIR = "oos_detector"
IN_SCOPE = "in_scope"


class OOSError(ValueError):
    """The data cannot support the requested out-of-scope policy."""


@dataclass
class OOSPolicy:
    """How a classifier's probabilities become (label, out_of_scope) answers (Larson et al. 2019, sec. 4).

    ``threshold`` (policy ``threshold``): predict ``label`` when the best in-scope probability is below it.
    ``detector`` (policy ``binary``): an estimator over labels ``[in_scope, <label>]``; the text is oos
    when its oos probability is at least ``detector_threshold``.
    """

    policy: str = "train"
    label: str = "oos"
    threshold: float | None = None
    detector: Any = None
    detector_threshold: float = 0.5
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

    def decide(self, probs: np.ndarray, labels: Sequence[str], texts: Sequence[str]) -> list[str]:
        """Final labels for ``probs`` (N, C) over ``labels``; ``self.label`` marks out-of-scope answers."""
        probs = np.asarray(probs, dtype=np.float64)
        labels = list(labels)
        t = self.threshold if self.policy == "threshold" and self.threshold is not None else 0.0
        # apply_oos_threshold with t=0 is the plain argmax (an oos class stays oos).
        preds = apply_oos_threshold(probs, labels, t, self.label)
        p_oos = self.oos_probability(texts)
        if p_oos is not None:
            preds = [self.label if p >= self.detector_threshold else y for y, p in zip(preds, p_oos, strict=True)]
        return preds

    # -- persistence --------------------------------------------------------------------------------------

    def to_metadata(self) -> dict:
        meta: dict[str, Any] = {"policy": self.policy, "label": self.label, "threshold": self.threshold}
        if self.policy == "binary":
            meta.update(detector=DETECTOR_DIR, detector_threshold=self.detector_threshold)
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
        return policy


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


def choose_detector_threshold(main_preds: Sequence[str], p_oos: np.ndarray, y_true: Sequence[str], label: str,
                              grid: Sequence[float] = DEFAULT_OOS_GRID) -> tuple[float, dict]:
    """The detector threshold maximising in-scope accuracy + OOS recall on validation (ties: 0.5 side)."""
    best: tuple[float, float, dict] | None = None
    for t in grid:
        preds = [label if p >= t else y for y, p in zip(main_preds, p_oos, strict=True)]
        m = oos_metrics(y_true, preds, label)
        score = (m["in_scope_accuracy"] or 0.0) + (m["oos_recall"] or 0.0)
        key = (score, -abs(t - 0.5))
        if best is None or key > (best[0], -abs(best[1] - 0.5)):
            best = (score, float(t), m)
    assert best is not None
    return best[1], {**best[2], "criterion": best[0]}


def fit_policy(cfg_oos, predict_proba: Callable[[list[str]], np.ndarray], labels: Sequence[str],
               valid_texts: Sequence[str], valid_labels: Sequence[str],
               train_texts: Sequence[str] = (), train_labels: Sequence[str] = (), seed: int = 0) -> OOSPolicy:
    """Build the policy the config's ``oos`` section asks for, fitting what it needs.

    ``predict_proba`` scores texts with the trained intent model (columns in ``labels`` order);
    ``train_*`` are the full training data (with oos examples: the binary detector learns from them).
    """
    policy = OOSPolicy(policy=cfg_oos.policy, label=cfg_oos.label, threshold=cfg_oos.threshold)
    if policy.policy == "train":
        return policy
    valid_texts, valid_labels = list(valid_texts), [str(v) for v in valid_labels]
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
