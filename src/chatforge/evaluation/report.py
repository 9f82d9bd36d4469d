"""Evaluation reports: JSON (machine-readable), Markdown (for people and PRs) and PNG plots.

Every file is written atomically (temp file in the same folder + ``os.replace``) so a reader —
a leaderboard, a CI job, a crashed-and-resumed run — never sees a half-written report.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from chatforge.evaluation import metrics as M
from chatforge.evaluation import plots
from chatforge.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


# Characters that start inline markup in CommonMark/GFM (emphasis, code spans, links and images, raw HTML,
# entities, strikethrough, GitHub's math): each is backslash-escaped, so text is shown as it was written. Block
# markup (`#`, `-`, `>` at a line's start) cannot start inside a table cell and is left alone for readability.
# `_` inside a word (`val_accuracy`) cannot open or close emphasis and stays as it is.
_MD_INLINE_SPECIAL = re.compile(r"[\\`*\[\]<>~&$!]|(?<![^\W_])_|_(?![^\W_])")
# GFM's autolinks turn bare text into links: a URL scheme's "://" and "www." (cmark-gfm, GitHub's renderer, stops at
# an escaped ":" or "."; a bare e-mail address is linked whatever is escaped). A reply that names a URL is shown as
# text, not as a link a reader could follow from a table of model output.
_AUTOLINK = re.compile(r"(?i)(?<=[a-z0-9])(:)(?=//)|(?<![a-z0-9])www(\.)")
# What GitHub still links or replaces in text: an e-mail address (cmark-gfm's autolink, which no escape stops), @name
# (a user mention), #123 (an issue of the repository showing the file) and :name: (an emoji). An empty HTML comment
# right after the "@", "#" or first ":" splits the text where each would start: the cell reads the same, and nothing
# in it is linked or replaced. (Raw HTML like the cells' <br>: a viewer that shows raw HTML as text shows both.)
_GITHUB_REFERENCE = re.compile(r"(?<=@)(?=[A-Za-z0-9_])|(?<!&#)(?<=#)(?=\d)|(?<=:)(?=[A-Za-z0-9_+-]+:)")
EMPTY_COMMENT = "<!-- -->"
# Every line break a Markdown or HTML viewer (or str.splitlines) would honour.
_LINE_BREAK = re.compile("\r\n|[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def md_text(value) -> str:
    """``value`` as the literal text of one Markdown table cell (or inline line): inline markup escaped,
    ``|`` written as the entity ``&#124;`` (a GFM table splits rows at a pipe before any backslash escape is
    read, so ``\\|`` after a backslash in the text would still split the cell), line breaks as ``<br>``, and an
    empty HTML comment where GitHub would start a link, mention or emoji (``_GITHUB_REFERENCE``)."""
    text = _MD_INLINE_SPECIAL.sub(lambda m: "\\" + m.group(0), str(value)).replace("|", "&#124;")
    text = _AUTOLINK.sub(lambda m: "\\" + m.group(0) if m.group(1) else m.group(0)[:-1] + "\\.", text)
    text = _GITHUB_REFERENCE.sub(EMPTY_COMMENT, text)
    return _LINE_BREAK.sub("<br>", text)


def _md_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if value is None:
        return "-"
    return md_text(value)


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GFM table; every header and cell is escaped (questions, replies, labels and model names are data)."""
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _rasa_style_per_label(cls: dict) -> dict:
    """Per-label section shaped like Rasa's ``intent_report.json`` (f1-score, confused_with)."""
    labels = cls["labels"]
    cm = np.asarray(cls["confusion_matrix"])
    out: dict[str, dict] = {}
    for i, label in enumerate(labels):
        row = cls["per_label"][label]
        confused = {labels[j]: int(cm[i, j]) for j in np.argsort(-cm[i], kind="stable") if j != i and cm[i, j] > 0}
        out[label] = {
            "precision": row["precision"],
            "recall": row["recall"],
            "f1-score": row["f1"],
            "support": row["support"],
            "confused_with": dict(list(confused.items())[:5]),
        }
    return out


def write_classification_report(
    out_dir: str | os.PathLike,
    y_true: Sequence[str],
    y_pred: Sequence[str],
    probs: np.ndarray | None,
    labels: Sequence[str],
    texts: Sequence[str],
    *,
    oos_label: str | None = None,
    title: str = "Classification report",
    top_k_plot: int = 25,
    n_top_confusions: int = 20,
) -> dict:
    """Write ``report.json``, ``errors.json``, ``report.md``, ``confusion_matrix.png`` and
    ``confidence_histogram.png`` (the last only when ``probs`` is given) to ``out_dir``.

    ``labels`` names the columns of ``probs`` (the model's class order). A prediction's confidence
    is the probability of the predicted label, or the max probability when the predicted label is
    not a column (e.g. ``oos`` produced by a threshold on a model without an oos class).
    ``confusion_matrix.png`` shows only the ``top_k_plot`` most-confused labels when there are more.
    Returns the metrics dict written to ``report.json``.
    """
    out = Path(out_dir)
    n = len(y_true)
    M._check_same_length(y_true, y_pred, "y_true", "y_pred")
    M._check_same_length(y_true, texts, "y_true", "texts")
    labels = [str(x) for x in labels]
    conf: list[float] | None = None
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape != (n, len(labels)):
            raise ValueError(f"probs must have shape ({n}, {len(labels)}) = (examples, labels), got {probs.shape}")
        col = {label: i for i, label in enumerate(labels)}
        conf = [float(probs[i, col[p]]) if p in col else float(probs[i].max()) for i, p in enumerate(y_pred)]

    all_labels = list(labels) + sorted((set(y_true) | set(y_pred)) - set(labels))
    cls = M.classification_metrics(y_true, y_pred, labels=all_labels)
    # The matrix keeps every label the model knows; macro-F1 averages those that occur in the data or the
    # predictions (scikit-learn's default), so held-out data with a few of the intents is not scored as if each
    # intent it lacks were an F1 of 0.
    occurring = set(y_true) | set(y_pred)
    cls["macro_f1"] = float(np.mean([cls["per_label"][label]["f1"] for label in all_labels if label in occurring]))
    report: dict = {
        "title": title,
        "n": n,
        "accuracy": cls["accuracy"],
        "macro_f1": cls["macro_f1"],
        "weighted_f1": cls["weighted_f1"],
        "per_label": _rasa_style_per_label(cls),
        "labels": cls["labels"],
        "confusion_matrix": cls["confusion_matrix"],
        "top_confusions": cls["top_confusions"],
    }
    if oos_label is not None:
        report["oos"] = M.oos_metrics(y_true, y_pred, oos_label)
    if conf is not None:
        correct = [t == p for t, p in zip(y_true, y_pred, strict=True)]
        report["confidence"] = M.confidence_histogram(conf, correct)

    errors = [
        {"text": texts[i], "true": y_true[i], "pred": y_pred[i], "confidence": None if conf is None else conf[i]}
        for i in range(n)
        if y_true[i] != y_pred[i]
    ]
    # Confident mistakes first: they are the most instructive (label noise, systematic confusions).
    errors.sort(key=lambda e: -(e["confidence"] or 0.0))


    atomic_write_json(out / "report.json", report)
    atomic_write_json(out / "errors.json", errors)
    atomic_write_bytes(
        out / "confusion_matrix.png", plots.confusion_matrix_png(cls["confusion_matrix"], cls["labels"], top_k_plot, title)
    )
    if conf is not None:
        atomic_write_bytes(out / "confidence_histogram.png", plots.confidence_histogram_png(report["confidence"], title))

    summary = [("examples", n), ("accuracy", report["accuracy"]), ("macro-F1", report["macro_f1"]),
               ("weighted-F1", report["weighted_f1"])]
    if "oos" in report:
        o = report["oos"]
        summary += [("in-scope accuracy", o["in_scope_accuracy"]), ("OOS recall", o["oos_recall"]),
                    ("OOS precision", o["oos_precision"])]
    if "confidence" in report:
        summary.append(("ECE", report["confidence"]["ece"]))
    worst = sorted(((k, v) for k, v in cls["per_label"].items() if k in occurring),
                   key=lambda kv: (kv[1]["f1"], kv[0]))[:10]
    md = [
        f"# {title}",
        "",
        _md_table(["metric", "value"], summary),
        "",
        "## Top confusions",
        "",
        _md_table(["true", "predicted", "count"],
                  [(c["true"], c["pred"], c["count"]) for c in cls["top_confusions"][:n_top_confusions]]),
        "",
        "## Lowest-F1 labels",
        "",
        _md_table(["label", "precision", "recall", "F1", "support"],
                  [(k, v["precision"], v["recall"], v["f1"], v["support"]) for k, v in worst]),
        "",
        f"{len(errors)} errors in `errors.json`; plots: `confusion_matrix.png`"
        + (", `confidence_histogram.png`" if conf is not None else ""),
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(md))
    logger.info("wrote classification report to %s (accuracy %.4f)", out, report["accuracy"])
    return report


def write_generation_report(
    out_dir: str | os.PathLike,
    sources: Sequence[str],
    hyps: Sequence[str],
    refs: Sequence[str],
    nll: float | None = None,
    n_tokens: int | None = None,
    *,
    tokenize: str = "13a",
    title: str = "Generation report",
    n_samples: int = 20,
) -> dict:
    """Write ``generation_report.json`` and ``generation_report.md`` (BLEU, distinct-1/2, average
    length, perplexity when ``nll`` (summed, nats) and ``n_tokens`` are given, sample replies).

    ``tokenize`` is passed to sacrebleu (use "char" for Korean; see ``metrics.corpus_bleu``).
    The names differ from the classification report's so both can share one run folder.
    """
    M._check_same_length(sources, hyps, "sources", "hyps")
    M._check_same_length(hyps, refs, "hyps", "refs")
    if (nll is None) != (n_tokens is None):
        raise ValueError("give both nll and n_tokens for perplexity, or neither")
    char_level = tokenize == "char"
    tok = list if char_level else None  # distinct-n in the same units as BLEU
    result: dict = {
        "title": title,
        "n": len(hyps),
        "bleu": M.corpus_bleu(hyps, refs, tokenize=tokenize),
        "bleu_tokenize": tokenize,
        "distinct_1": M.distinct_n(hyps, 1, tok),
        "distinct_2": M.distinct_n(hyps, 2, tok),
        "avg_length": M.average_length(hyps, tok),
        "avg_ref_length": M.average_length(refs, tok),
        "length_unit": "characters" if char_level else "whitespace tokens",
        "perplexity": None if nll is None else M.perplexity(nll, n_tokens),
        "samples": [{"source": s, "hyp": h, "ref": r} for s, h, r in list(zip(sources, hyps, refs, strict=True))[:n_samples]],
    }
    if result["perplexity"] is not None and not np.isfinite(result["perplexity"]):
        result["perplexity"] = None  # strict JSON has no Infinity
        result["perplexity_overflow"] = True
    out = Path(out_dir)
    atomic_write_json(out / "generation_report.json", result)
    md = [
        f"# {title}",
        "",
        _md_table(["metric", "value"], [
            ("examples", result["n"]), (f"BLEU ({tokenize})", result["bleu"]),
            ("distinct-1", result["distinct_1"]), ("distinct-2", result["distinct_2"]),
            (f"avg length ({result['length_unit']})", result["avg_length"]),
            ("avg reference length", result["avg_ref_length"]), ("perplexity", result["perplexity"]),
        ]),
        "",
        "## Sample replies",
        "",
        _md_table(["source", "reply", "reference"], [(s["source"], s["hyp"], s["ref"]) for s in result["samples"]]),
        "",
    ]
    atomic_write_text(out / "generation_report.md", "\n".join(md))
    logger.info("wrote generation report to %s (BLEU %.2f)", out, result["bleu"])
    return result
