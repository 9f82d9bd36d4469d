"""Held-out figures for out-of-scope policies that were fitted on the data they are scored on.

The oos-threshold, oos-binary and oos-scorer policies choose a threshold (the scorer also its
logistic regression) on the validation split; scored on that same split they are optimistic. When
there is no other labelled split (CLINC150 here: its test lists are not in ../shared/data),
**cross-fitting** gives honest figures: deal each label's examples to ``folds`` folds at random,
fit the validation-fitted part on all folds but one, predict the held-out fold, so no prediction
saw its own label; repeat over ``repeats`` fold assignments and report the mean and the worst.

What is refitted per policy (everything fitted on the training data stays as it is):
``threshold`` the threshold; ``binary`` the detector's threshold; ``scorer`` its regression and
threshold (its neighbours are training examples). ``train`` fits nothing on validation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np

from chatforge.evaluation.metrics import (
    DEFAULT_OOS_GRID,
    apply_oos_threshold,
    choose_oos_threshold,
    oos_metrics,
)
from chatforge.oos import choose_flag_threshold

FitApply = Callable[[np.ndarray, np.ndarray], list[str]]


def folds_by_label(y: Sequence[str], k: int, rng: np.random.Generator) -> np.ndarray:
    """A fold number per example; each label's examples are dealt round-robin in a random order."""
    if k < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {k}")
    out = np.empty(len(y), dtype=int)
    by: dict[str, list[int]] = {}
    for i, v in enumerate(y):
        by.setdefault(str(v), []).append(i)
    for idx in by.values():
        out[rng.permutation(idx)] = np.arange(len(idx)) % k
    return out


def cross_fit(y: Sequence[str], fit_apply: FitApply, oos_label: str = "oos", folds: int = 10, repeats: int = 10,
              seed: int = 0) -> dict:
    """Cross-fitted in-scope accuracy and OOS recall: mean over ``repeats`` fold assignments, and the worst.

    ``fit_apply(fit_idx, apply_idx)`` fits on the examples ``fit_idx`` (their labels may be read) and
    returns predictions for ``apply_idx`` (whose labels it must not read).
    """
    y = [str(v) for v in y]
    if oos_label not in y or all(v == oos_label for v in y):
        raise ValueError(f"cross-fitting an oos policy needs in-scope and {oos_label!r} examples")
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(repeats):
        fold = folds_by_label(y, folds, rng)
        pred = [""] * len(y)
        for j in range(folds):
            fit, app = np.flatnonzero(fold != j), np.flatnonzero(fold == j)
            for i, p in zip(app, fit_apply(fit, app), strict=True):
                pred[i] = p
        runs.append(oos_metrics(y, pred, oos_label))
    keys = ("in_scope_accuracy", "oos_recall")
    out: dict = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    out.update({f"min_{k}": float(min(r[k] for r in runs)) for k in keys})
    out.update(folds=folds, repeats=repeats, seed=seed)
    return out


def threshold_fit_apply(probs: np.ndarray, labels: Sequence[str], y: Sequence[str], oos_label: str = "oos",
                        max_in_scope_drop: float | None = None) -> FitApply:
    """The oos-threshold policy: the threshold chosen on the fitting folds (``choose_oos_threshold``)."""
    probs, labels, y = np.asarray(probs), list(labels), [str(v) for v in y]

    def fit_apply(fit, app):
        t, _ = choose_oos_threshold(probs[fit], [y[i] for i in fit], labels, oos_label,
                                    max_in_scope_drop=max_in_scope_drop)
        return apply_oos_threshold(probs[app], labels, t, oos_label)
    return fit_apply


def flag_fit_apply(main: Sequence[str], p_oos: np.ndarray, y: Sequence[str], oos_label: str = "oos",
                   max_in_scope_drop: float | None = None, prefer: float = 0.5,
                   grid: Sequence[float] | None = None) -> FitApply:
    """A fixed P(oos) per example (the oos-binary detector's) with its threshold chosen on the fitting folds."""

    main, p, y = np.asarray(list(main), dtype=object), np.asarray(p_oos, dtype=np.float64), [str(v) for v in y]

    def fit_apply(fit, app):
        t, _ = choose_flag_threshold(main[fit], p[fit], [y[i] for i in fit], oos_label, grid=grid,
                                     max_in_scope_drop=max_in_scope_drop, prefer=prefer)
        return [oos_label if q >= t else m for m, q in zip(main[app], p[app], strict=True)]
    return fit_apply


def scorer_fit_apply(scorer, features: np.ndarray, main: Sequence[str], y: Sequence[str], oos_label: str = "oos",
                     max_in_scope_drop: float | None = None) -> FitApply:
    """The oos scorer: its regression and threshold fitted on the fitting folds; ``scorer`` (its
    neighbour index) is not modified, a copy is refitted."""

    work = copy.copy(scorer)
    feats = np.asarray(features, dtype=np.float64)
    main, y = np.asarray(list(main), dtype=object), [str(v) for v in y]

    def fit_apply(fit, app):
        work.fit(feats[fit], [y[i] == oos_label for i in fit])
        t, _ = choose_flag_threshold(main[fit], work.score(feats[fit]), [y[i] for i in fit], oos_label,
                                     max_in_scope_drop=max_in_scope_drop, prefer=1.0)
        return [oos_label if q >= t else m for m, q in zip(main[app], work.score(feats[app]), strict=True)]
    return fit_apply


def policy_fit_apply(policy, views: Sequence[np.ndarray], labels: Sequence[str], texts: Sequence[str],
                     y: Sequence[str], max_in_scope_drop: float | None = None) -> FitApply | None:
    """The fit/apply pair that cross-fits ``policy`` (an :class:`chatforge.oos.OOSPolicy`), or None when
    it fits nothing on validation (``train``)."""
    labels = list(labels)
    probs = np.asarray(views[0])
    main = apply_oos_threshold(probs, labels, 0.0, policy.label)
    if policy.policy == "threshold":
        return threshold_fit_apply(probs, labels, y, policy.label, max_in_scope_drop)
    if policy.policy == "binary":
        # as fit_policy fits it: the paper's criterion over the default grid, no accuracy bound
        return flag_fit_apply(main, policy.oos_probability(texts), y, policy.label, None, grid=DEFAULT_OOS_GRID)
    if policy.policy == "scorer":
        feats = policy.scorer.features(list(views), labels, list(texts))
        return scorer_fit_apply(policy.scorer, feats, main, y, policy.label, max_in_scope_drop)
    return None
