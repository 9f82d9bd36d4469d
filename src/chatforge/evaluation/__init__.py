"""Evaluation: metrics (pure functions) and reports (JSON + Markdown + PNG, written atomically)."""

from chatforge.evaluation.metrics import (
    apply_oos_threshold,
    average_length,
    choose_oos_threshold,
    classification_metrics,
    confidence_histogram,
    corpus_bleu,
    distinct_n,
    oos_metrics,
    perplexity,
)
from chatforge.evaluation.report import write_classification_report, write_generation_report

__all__ = [
    "apply_oos_threshold",
    "average_length",
    "choose_oos_threshold",
    "classification_metrics",
    "confidence_histogram",
    "corpus_bleu",
    "distinct_n",
    "oos_metrics",
    "perplexity",
    "write_classification_report",
    "write_generation_report",
]
