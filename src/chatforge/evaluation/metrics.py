"""Evaluation metrics: pure functions over python lists / numpy arrays.

Everything here is small enough to check by hand; the tests do exactly that.
Undefined ratios (e.g. precision of a label that is never predicted) are 0.0,
as in scikit-learn's ``zero_division=0``; ratios over an empty population that
have no sensible default (in-scope accuracy with no in-scope examples) are ``None``
so that JSON reports stay strict (no NaN).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# The out-of-scope metrics and threshold live with the one oos policy (chatforge.oos); re-exported here.
from chatforge.oos import DEFAULT_OOS_GRID, apply_oos_threshold, choose_oos_threshold, oos_metrics  # noqa: E402, F401


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def _check_same_length(a: Sequence, b: Sequence, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}")


# ---------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None
) -> dict:
    """Accuracy, macro/weighted F1, per-label P/R/F1/support, confusion matrix and top confusions.

    ``labels`` fixes the label order (and the set averaged over by macro-F1); by default it is
    the sorted union of true and predicted labels. Confusion matrix rows are true labels,
    columns predicted labels. ``top_confusions`` lists off-diagonal (true, predicted) pairs by
    count, largest first (ties by name, so the order is deterministic).
    """
    y_true = [str(y) for y in y_true]
    y_pred = [str(y) for y in y_pred]
    _check_same_length(y_true, y_pred, "y_true", "y_pred")
    if not y_true:
        raise ValueError("classification_metrics needs at least one example, got empty y_true")
    if labels is None:
        labels = sorted(set(y_true) | set(y_pred))
    labels = [str(label) for label in labels]
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be unique")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted((set(y_true) | set(y_pred)) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:10]} occur in y_true/y_pred but not in labels={labels[:10]}...")

    k = len(labels)
    cm = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        cm[index[t], index[p]] += 1

    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    per_label: dict[str, dict] = {}
    f1s = []
    for i, label in enumerate(labels):
        precision = _safe_div(tp[i], predicted[i])
        recall = _safe_div(tp[i], support[i])
        f1 = _safe_div(2 * precision * recall, precision + recall)
        f1s.append(f1)
        per_label[label] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(support[i]),
        }

    n = len(y_true)
    confusions = [
        {"true": labels[i], "pred": labels[j], "count": int(cm[i, j])}
        for i in range(k)
        for j in range(k)
        if i != j and cm[i, j] > 0
    ]
    confusions.sort(key=lambda c: (-c["count"], c["true"], c["pred"]))
    return {
        "n": n,
        "accuracy": _safe_div(tp.sum(), n),
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "weighted_f1": _safe_div(float(np.dot(f1s, support)), support.sum()),
        "per_label": per_label,
        "labels": labels,
        "confusion_matrix": cm.tolist(),
        "top_confusions": confusions,
    }


# ---------------------------------------------------------------------------------------------------------
# Out-of-scope detection (Larson et al., 2019, "An Evaluation Dataset for Intent Classification and
# Out-of-Scope Prediction", EMNLP, section 4)
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], tokenize: str = "13a") -> float:
    """Corpus BLEU (Papineni et al. 2002) via sacrebleu, on a 0-100 scale.

    ``refs`` is one reference per hypothesis (``list[str]``) or several per hypothesis
    (``list[list[str]]``, all of equal count). ``tokenize`` is sacrebleu's: "13a" (default,
    WMT) for English; for Korean use "char" (character BLEU: no morphological analyser needed,
    robust to Korean's agglutinative spacing) or "intl" (splits Unicode punctuation but keeps
    space-separated eojeol whole, so it is harsher); "ko-mecab" needs MeCab installed.
    """
    # lazy: only BLEU needs sacrebleu; training and serving import this module for the oos metrics
    import sacrebleu

    if not hyps:
        raise ValueError("corpus_bleu needs at least one hypothesis")
    _check_same_length(hyps, refs, "hyps", "refs")
    if all(isinstance(r, str) for r in refs):
        streams = [list(refs)]
    else:
        counts = {len(r) for r in refs}
        if len(counts) != 1:
            raise ValueError(f"every hypothesis needs the same number of references, got counts {sorted(counts)}")
        streams = [list(s) for s in zip(*refs, strict=True)]
    return float(sacrebleu.corpus_bleu(list(hyps), streams, tokenize=tokenize).score)


def _tokens(text: str, tokenizer: Callable[[str], list[str]] | None) -> list[str]:
    return tokenizer(text) if tokenizer is not None else text.split()


def distinct_n(texts: Sequence[str], n: int, tokenizer: Callable[[str], list[str]] | None = None) -> float:
    """Distinct-n (Li et al. 2016, section 4.3): unique n-grams / total n-grams over the whole corpus.

    Tokens are whitespace-split unless ``tokenizer`` is given (e.g. ``list`` for characters,
    sensible for Korean). Returns 0.0 when the corpus has no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams: Counter = Counter()
    for text in texts:
        toks = _tokens(text, tokenizer)
        grams.update(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
    return _safe_div(len(grams), sum(grams.values()))


def average_length(texts: Sequence[str], tokenizer: Callable[[str], list[str]] | None = None) -> float:
    """Mean number of tokens per text (whitespace tokens unless ``tokenizer`` is given)."""
    if not texts:
        return 0.0
    return sum(len(_tokens(t, tokenizer)) for t in texts) / len(texts)


def corpus_chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (Popović 2015; character n-grams up to 6, beta 2) via sacrebleu, on a 0-100 scale.

    Character-based, so it needs no Korean word segmentation and gives partial credit to a reply
    that shares syllables with the reference, unlike exact-match figures.
    """
    import sacrebleu  # lazy: see corpus_bleu

    if not hyps:
        raise ValueError("corpus_chrf needs at least one hypothesis")
    _check_same_length(hyps, refs, "hyps", "refs")
    return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)


def repetition_rate(texts: Sequence[str], run: int = 3, tokenizer: Callable[[str], list[str]] | None = None) -> float:
    """Share of texts in which one token occurs ``run`` or more times in a row ("좋아 좋아 좋아").

    The degenerate loop of greedy decoding after short training; whitespace tokens unless
    ``tokenizer`` is given. 0.0 for no texts.
    """
    if run < 2:
        raise ValueError(f"run must be >= 2, got {run}")

    def repeats(toks: list[str]) -> bool:
        streak = 1
        for a, b in zip(toks, toks[1:], strict=False):  # pairs of neighbours: one shorter by design
            streak = streak + 1 if a == b else 1
            if streak >= run:
                return True
        return False

    return _safe_div(sum(repeats(_tokens(t, tokenizer)) for t in texts), len(texts))


def identical_reply_rate(sources: Sequence[str], replies: Sequence[str]) -> float:
    """Share of replies that are also the reply to a *different* input: the generic-answer rate.

    A reply given to two distinct sources counts once per such source (both are generic);
    repeated identical sources do not make their shared reply count.
    """
    _check_same_length(sources, replies, "sources", "replies")
    inputs_per_reply: dict[str, set[str]] = {}
    for s, r in zip(sources, replies, strict=True):
        inputs_per_reply.setdefault(r, set()).add(s)
    return _safe_div(sum(len(inputs_per_reply[r]) > 1 for r in replies), len(replies))


def generation_quality(sources: Sequence[str], hyps: Sequence[str], refs: Sequence[str], *,
                       char_level: bool = True) -> dict[str, float]:
    """The reply-quality figures every chit-chat approach is compared on (one dict, same keys for all).

    chrF, BLEU ("char" tokenisation for Korean, else 13a), distinct-1/2 and mean length (characters for
    Korean, else whitespace tokens), the share of replies with a token repeated 3+ times in a row
    (whitespace tokens: the repeated unit of a degenerate reply is a word) and the share of replies
    identical for different inputs.
    """
    tok = list if char_level else None
    return {
        "chrf": corpus_chrf(hyps, refs),
        "bleu": corpus_bleu(hyps, refs, tokenize="char" if char_level else "13a"),
        "distinct_1": distinct_n(hyps, 1, tok),
        "distinct_2": distinct_n(hyps, 2, tok),
        "avg_length": average_length(hyps, tok),
        "repeat_3_rate": repetition_rate(hyps, 3),
        "identical_rate": identical_reply_rate(sources, hyps),
    }


# ---------------------------------------------------------------------------------------------------------
# Response selection (Humeau et al. 2020, "Poly-encoders", section 5: R@1 of C candidates; MRR)
# ---------------------------------------------------------------------------------------------------------


def selection_candidates(answers: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """For each example, ``[true answer] + (k - 1)`` distinct distractors drawn from the *other* answers.

    Distractors are drawn without replacement from the distinct answer texts of the split that differ
    from the true one (ChatbotData repeats answers: an identical text is no distractor), with a numpy
    generator seeded by ``seed``: the same split and seed give the same candidates on every machine.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 (the true answer and at least one distractor), got {k}")
    distinct = sorted(set(answers))
    if len(distinct) < k:
        raise ValueError(f"R@1 of {k} needs at least {k} distinct answers in the split, found {len(distinct)}")
    index = {a: i for i, a in enumerate(distinct)}
    rng = np.random.default_rng(seed)
    out = []
    for a in answers:
        # Draw k-1 of the len(distinct)-1 others: sample positions in a list that skips the true answer.
        pos = rng.choice(len(distinct) - 1, size=k - 1, replace=False)
        pos = pos + (pos >= index[a])
        out.append([a] + [distinct[int(j)] for j in pos])
    return out


def true_rank(scores: Sequence[float]) -> int:
    """0-based rank of candidate 0 (the true one) among ``scores``; ties count against it."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D sequence, got shape {s.shape}")
    return int((s[1:] >= s[0]).sum())


def selection_metrics(ranks: Sequence[int]) -> dict[str, float]:
    """R@1 (share of rank 0) and MRR (mean of 1 / (rank + 1)) over 0-based ranks."""
    r = np.asarray(ranks, dtype=np.int64)
    if r.size == 0:
        raise ValueError("selection_metrics needs at least one rank")
    if (r < 0).any():
        raise ValueError("ranks must be >= 0")
    return {"r1": float((r == 0).mean()), "mrr": float((1.0 / (r + 1)).mean())}


SELECTION_SIZES = (10, 100)


def selection_report(score: Callable[[list[str], list[list[str]]], list], questions: Sequence[str],
                     answers: Sequence[str], seed: int, sizes: Sequence[int] = SELECTION_SIZES) -> dict[str, float]:
    """``r1_of_C`` and ``mrr_of_C`` for each candidate count C (skipped when the split has fewer than C
    distinct answers), with ``score(questions, candidate_lists)`` -> one score array per question and
    candidates from :func:`selection_candidates` (``seed`` fixes them: use one per split)."""
    out: dict[str, float] = {}
    n_distinct = len(set(answers))
    for k in sizes:
        if n_distinct < k:
            logger.warning("R@1 of %d skipped: the split has only %d distinct answers", k, n_distinct)
            continue
        cands = selection_candidates(answers, k, seed)
        m = selection_metrics([true_rank(s) for s in score(list(questions), cands)])
        out[f"r1_of_{k}"], out[f"mrr_of_{k}"] = m["r1"], m["mrr"]
    return out


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(total negative log-likelihood in nats / number of tokens); ``inf`` if it overflows."""
    if total_tokens <= 0:
        raise ValueError(f"total_tokens must be > 0, got {total_tokens}")
    try:
        return math.exp(total_nll / total_tokens)
    except OverflowError:
        return math.inf


# ---------------------------------------------------------------------------------------------------------
# Confidence / calibration
# ---------------------------------------------------------------------------------------------------------


def confidence_histogram(scores: Sequence[float], correct: Sequence[bool], bins: int = 10) -> dict:
    """Counts of correct and wrong predictions per confidence bin over [0, 1].

    Also returns per-bin accuracy and mean confidence and the expected calibration error
    (ECE, Guo et al. 2017, "On Calibration of Modern Neural Networks", section 2):
    ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|``. Bins are ``[e_i, e_{i+1})``; 1.0 falls in the last.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    _check_same_length(scores, correct, "scores", "correct")
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    if s.size and (s.min() < 0 or s.max() > 1):
        raise ValueError(f"scores must lie in [0, 1], got range [{s.min()}, {s.max()}]")
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    n_correct = np.bincount(idx[c], minlength=bins)
    n_wrong = np.bincount(idx[~c], minlength=bins)
    total = n_correct + n_wrong
    conf_sum = np.bincount(idx, weights=s, minlength=bins)
    accuracy = [_safe_div(a, t) for a, t in zip(n_correct, total, strict=True)]
    mean_conf = [_safe_div(a, t) for a, t in zip(conf_sum, total, strict=True)]
    n = int(total.sum())
    ece = sum(_safe_div(t, n) * abs(a - m) for t, a, m in zip(total, accuracy, mean_conf, strict=True))
    return {
        "edges": edges.tolist(),
        "correct": n_correct.astype(int).tolist(),
        "wrong": n_wrong.astype(int).tolist(),
        "accuracy": accuracy,
        "mean_confidence": mean_conf,
        "ece": float(ece),
    }
