"""Knowledge distillation into a torch classifier (``train.distill_from``; Hinton et al. 2015).

The teacher is any trained classification bundle (a linear model, an ensemble, a torch classifier): its class
probabilities on the run's training texts become soft targets (:class:`chatforge.tasks.SoftTargetDataset`), and the
Trainer mixes the distillation term into the loss. The typical use: one Transformer that serves at an ensemble's
accuracy (docs/results/clinc150.md).

A teacher that trained on the run's held-out examples would leak them into the student and into every figure
reported on them, so the teacher must hold out exactly the run's held-out split: :func:`check_held_out` compares
the lists. (An ensemble teacher's members are held to its split when the ensemble is trained.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatforge.bundle import Bundle, load_bundle
from chatforge.config import ConfigError, ExperimentConfig
from chatforge.data import Example

log = logging.getLogger(__name__)

SplitLoader = Callable[[ExperimentConfig], tuple[list[Example], list[Example], list[Example], Path]]


def load_teacher(path: str) -> Bundle:
    """The teacher bundle: a bundle folder, or a run folder holding ``bundle/``; refused unless it classifies."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"train.distill_from: {path} does not exist (a classifier bundle or a run folder)")
    bundle = load_bundle(p / "bundle" if (p / "bundle").is_dir() else p)
    if bundle.task != "classification":
        raise ConfigError(f"train.distill_from: {path} is a {bundle.task!r} bundle; the teacher must be a "
                          f"classification bundle")
    return bundle


def load_teachers(spec: str | list[str]) -> list[Bundle]:
    """One teacher bundle, or the K bundles of a cross-fitted teacher (``train.distill_from`` as a list)."""
    return [load_teacher(p) for p in ([spec] if isinstance(spec, str) else spec)]


def check_crossfit(teachers: Sequence[Bundle], train: Sequence[Example], load_splits: SplitLoader) -> list[int]:
    """The fold of each training example, after checking that teacher i was trained on exactly the training
    examples outside fold i (``data.crossfit_fold`` {folds: K, fold: i}, one seed for all): so each example's soft
    targets come from a teacher that never saw it. Refused with the teacher and what differs named."""
    from chatforge.data.splits import fold_ids

    k = len(teachers)
    seeds = set()
    for i, t in enumerate(teachers):
        cf = t.config.data.crossfit_fold
        if cf is None or cf.folds != k or cf.fold != i:
            raise ConfigError(f"train.distill_from: entry {i} ({t.path}) must be trained with data.crossfit_fold "
                              f"{{folds: {k}, fold: {i}}} (one run per fold, in fold order); it has "
                              f"{None if cf is None else cf.model_dump()}")
        seeds.add(cf.seed)
    if len(seeds) > 1:
        raise ConfigError(f"train.distill_from: the folds' runs used different data.crossfit_fold seeds {sorted(seeds)}"
                          "; their folds overlap, so some examples were seen by their own teacher")
    ids = fold_ids(train, k, seeds.pop())
    for i, t in enumerate(teachers):
        try:
            theirs = load_splits(t.config)[0]
        except (ConfigError, OSError) as e:
            raise ConfigError(f"train.distill_from: cannot rebuild the training split of {t.path}: {e}") from e
        want = sorted(_as_keys([e for e, f in zip(train, ids, strict=True) if f != i]))
        if sorted(_as_keys(theirs)) != want:
            raise ConfigError(f"train.distill_from: {t.path} (fold {i}) was not trained on this run's training "
                              f"examples outside fold {i} ({len(theirs)} examples against {len(want)}): train "
                              "the folds' runs with this config's data section and data.crossfit_fold")
    return ids


def _as_keys(examples: Sequence[Example]) -> list[tuple[str, str]]:
    return [(e.text, str(e.label)) for e in examples]


def check_held_out(teacher: Bundle, held_out: Sequence[Example], load_splits: SplitLoader) -> None:
    """Refuse a teacher whose training config holds out a different split than the run's ``held_out`` (its
    dev/test examples): those examples would have been in the teacher's training data."""
    if not held_out:
        return
    want = _as_keys(held_out)
    try:
        _, _, theirs, _ = load_splits(teacher.config)
    except (ConfigError, OSError) as e:
        raise ConfigError(f"train.distill_from: cannot rebuild the data split of {teacher.path} to check it held "
                          f"out this run's {len(want)} held-out examples: {e}") from e
    got = _as_keys(theirs)
    if got != want:
        leaked = len(set(want) - set(got))
        raise ConfigError(
            f"train.distill_from: {teacher.path} was trained with a different held-out split ({len(got)} examples "
            f"against this run's {len(want)}; {leaked} of this run's held-out examples were not held out by it), "
            f"so its soft targets would leak them. Train the teacher with this config's data section (data.path, "
            f"data.dev_fraction, data.dev_split, data.dev_seed, the seed for random splits)")


def teacher_probs(teacher: Bundle, texts: Sequence[str], labels: Sequence[str], batch_size: int = 512,
                  progress: Callable[[int, int], Any] | None = None) -> torch.Tensor:
    """(N, C) teacher probabilities for ``texts`` in the student's ``labels`` order; the two label sets must be
    the same (a teacher column the student lacks, or the reverse, is refused with both lists named)."""
    t_labels = [str(v) for v in (teacher.labels or [])]
    missing, extra = sorted(set(labels) - set(t_labels)), sorted(set(t_labels) - set(labels))
    if missing or extra:
        raise ConfigError(f"train.distill_from: the teacher's labels differ from this run's: labels only here "
                          f"{missing[:10]}, only in the teacher {extra[:10]}; distillation needs one label set")
    cols = [t_labels.index(v) for v in labels]
    out = []
    texts = list(texts)
    for i in range(0, len(texts), batch_size):
        p = np.asarray(teacher.predict_proba(texts[i:i + batch_size]), dtype=np.float64)[:, cols]
        out.append(p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None))
        if progress is not None:
            progress(min(i + batch_size, len(texts)), len(texts))
    probs = torch.from_numpy(np.concatenate(out) if out else np.zeros((0, len(labels)))).float()
    if probs.numel() and not bool(torch.isfinite(probs).all()):
        raise ConfigError(f"train.distill_from: the teacher {teacher.path} gave non-finite probabilities")
    return probs
