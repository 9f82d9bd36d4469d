"""``chatforge replies``: every served approach answers the same held-out questions, side by side.

For each named bundle (generation, lm or selection) and for the hybrid of a selection bundle and a
generation bundle (retrieval when its score clears a threshold, generation otherwise: the rule of
``chatforge.serving.policy`` without intents), this computes the reply-quality figures of
``metrics.generation_quality`` over the whole split and writes a reply table of the first ``n``
questions for people to read: ``replies.md``, ``replies.html`` and ``replies.json``; with a hybrid column
also ``policy.yaml``, the same hybrid as a serving policy (``chatforge serve --policy``).

The hybrid's threshold is chosen on the *validation* split (the one maximising the hybrid's chrF
there), never on the split it is reported on; so is its familiarity guard (``min_familiarity``: messages less like
the selector's training questions than all but ``familiarity_quantile`` of the validation questions get the
fallback reply, ``baselines.retrieval.familiarity``), whose share of fallbacks on the reported split is then a
held-out figure.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from chatforge.bundle import load_bundle
from chatforge.decoding import GenerationOptions, generate
from chatforge.evaluation.evaluate import EvaluationError, select_examples
from chatforge.evaluation.metrics import corpus_chrf, generation_quality
from chatforge.evaluation.report import _md_table, md_text
from chatforge.fileio import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

HYBRID = "hybrid"
DEFAULT_FALLBACK = "잘 모르겠어요. 다르게 말씀해 주시겠어요?"
DEFAULT_FAMILIARITY_QUANTILE = 0.01  # the share of validation questions the guard may send to the fallback


@dataclass
class Replies:
    texts: list[str]
    scores: list[float] | None = None  # selection: the best pool answer's score
    familiarity: list[float] | None = None  # selection: each question's familiarity to the training questions


def bundle_replies(bundle, questions: Sequence[str], max_new_tokens: int | None = None,
                   decoding: Mapping[str, Any] | None = None) -> Replies:
    """Replies of a generation bundle (greedy unless ``decoding`` says otherwise: fields of
    GenerationOptions such as ``no_repeat_ngram_size`` or ``repetition_penalty``), or the top pool answers
    (with scores) of a selection bundle."""
    if bundle.task == "selection":
        best = bundle.model.select(list(questions))
        return Replies([b[0][0] for b in best], [b[0][1] for b in best], bundle.model.familiarity(list(questions)))
    if bundle.task not in ("generation", "lm"):
        raise EvaluationError(f"bundle {bundle.path} has task {bundle.task!r}; replies come from generation, lm "
                              f"or selection bundles")
    cfg, tok, model = bundle.config, bundle.tokenizer, bundle.model
    allowed = [f.name for f in dataclasses.fields(GenerationOptions)]
    unknown = sorted(set(decoding or {}) - set(allowed))
    if unknown:
        raise EvaluationError(f"unknown decoding option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    try:
        opts = GenerationOptions(**{"max_new_tokens": max_new_tokens or cfg.train.max_target_len,
                                    **(decoding or {})}).validate()
    except (TypeError, ValueError) as e:
        raise EvaluationError(f"decoding options {dict(decoding or {})}: {e}") from None
    return Replies([tok.decode(generate(model, tok.encode(q)[: cfg.train.max_source_len] or [tok.unk_id], opts,
                                        bos_id=tok.bos_id, eos_id=tok.eos_id)) for q in questions])


def hybrid(selected: Replies, generated: Replies, threshold: float, min_familiarity: float | None = None,
           fallback: str = DEFAULT_FALLBACK) -> tuple[list[str], list[str]]:
    """The hybrid's replies and which path answered each one: the serving policy's rule (``serving.policy``)
    without intents. Below ``min_familiarity`` (None: no guard) the fallback reply answers, as out of scope."""
    if min_familiarity is not None and selected.familiarity is None:
        raise ValueError("min_familiarity needs the selector's familiarity of each question (Replies.familiarity)")
    fam = selected.familiarity if min_familiarity is not None else [0.0] * len(selected.scores)
    paths = ["fallback" if min_familiarity is not None and f < min_familiarity
             else "retrieval" if s >= threshold else "generation" for s, f in zip(selected.scores, fam, strict=True)]
    texts = [fallback if p == "fallback" else r if p == "retrieval" else g
             for r, g, p in zip(selected.texts, generated.texts, paths, strict=True)]
    return texts, paths


def choose_min_familiarity(familiarity: Sequence[float], quantile: float) -> float | None:
    """The guard's threshold: the ``quantile`` of the validation questions' familiarity (lower interpolation: an
    observed value, so about that share of them falls below it), None (no guard) for quantile 0."""
    if not 0.0 <= quantile < 0.5:
        raise EvaluationError(f"familiarity quantile {quantile!r} is out of range; allowed: [0, 0.5) (the share of "
                              "validation questions the guard may send to the fallback; 0: no guard)")
    if quantile == 0.0:
        return None
    if not len(familiarity):
        raise EvaluationError("no validation questions to choose the familiarity guard on; pass quantile 0")
    return float(np.quantile(np.asarray(familiarity, dtype=np.float64), quantile, method="lower"))


def choose_retrieval_threshold(selected: Replies, generated: Replies, refs: Sequence[str],
                               min_familiarity: float | None = None) -> float:
    """The threshold (one of the observed scores, or +inf: never retrieve) maximising the hybrid's chrF (with the
    familiarity guard in front, when given: the hybrid as it will be served)."""
    grid = sorted(set(selected.scores)) + [float("inf")]
    # chrF is a corpus statistic, so each candidate is scored whole; 600 validation pairs x ~600 thresholds
    # is seconds, and a subsampled grid (every 1 % quantile) keeps larger splits cheap.
    if len(grid) > 101:
        grid = sorted(set(np.quantile(selected.scores, np.linspace(0, 1, 101)).tolist())) + [float("inf")]
    best = max(grid, key=lambda t: (corpus_chrf(hybrid(selected, generated, t, min_familiarity)[0], refs), -t))
    return float(best)


def reply_table(models: Mapping[str, str | Path], *, hybrid_of: tuple[str, str] | None = None,
                split: str = "test", n: int = 30, out_dir: str | Path, max_new_tokens: int | None = None,
                max_examples: int | None = None, decoding: Mapping[str, Any] | None = None,
                familiarity_quantile: float = DEFAULT_FAMILIARITY_QUANTILE) -> dict:
    """Write the reply table and figures for ``models`` (name -> bundle) on ``split`` of their data.

    ``hybrid_of = (selection_name, generation_name)`` adds the hybrid column; its threshold is chosen
    on the valid split of the same data, and so is its familiarity guard (``familiarity_quantile`` of the validation
    questions fall below it; 0: no guard). All bundles must split the same data file the same way (same
    path, seed and fractions) so that every column answers the same questions: checked here.
    """
    if not models:
        raise EvaluationError("give at least one NAME=BUNDLE")
    # The table's rows are {question, reference, one column per model (and the hybrid's)}: a model of one of
    # those names would overwrite that column in replies.json/.md/.html.
    reserved = {"question", "reference", *([HYBRID] if hybrid_of is not None else [])}
    for name in models:
        if not name or name in reserved:
            raise EvaluationError(f"model name {name!r} is not allowed: the reply table's columns are "
                                  f"{', '.join(sorted(reserved))} and one per model; give it another NAME")
    bundles = {name: load_bundle(path) for name, path in models.items()}
    keys = {name: (b.config.data.path, b.config.seed, b.config.data.valid_fraction, b.config.data.test_fraction)
            for name, b in bundles.items()}
    if len(set(keys.values())) > 1:
        raise EvaluationError(f"the bundles split different data (path, seed, valid, test fractions): {keys}; "
                              f"a reply table compares answers to the same questions")
    first = next(iter(bundles.values()))
    examples, split_name, data_path = select_examples(first.config, None, split=split)
    examples = [e for e in examples if e.response][:max_examples] if max_examples else [e for e in examples
                                                                                         if e.response]
    questions, refs = [e.text for e in examples], [e.response for e in examples]
    korean = any(re.search(r"[\uac00-\ud7a3]", r) for r in refs[:50])
    columns: dict[str, list[str]] = {}
    figures: dict[str, dict] = {}
    replies: dict[str, Replies] = {}
    for name, b in bundles.items():
        logger.info("replies of %s on %d questions", name, len(questions))
        replies[name] = bundle_replies(b, questions, max_new_tokens, decoding)
        columns[name] = replies[name].texts
        figures[name] = {"family": b.family, "task": b.task, **generation_quality(questions, columns[name], refs,
                                                                                   char_level=korean)}
    extra: dict = {}
    if hybrid_of is not None:
        sel_name, gen_name = hybrid_of
        for name, task in ((sel_name, ("selection",)), (gen_name, ("generation", "lm"))):
            if name not in bundles or bundles[name].task not in task:
                raise EvaluationError(f"--hybrid {sel_name},{gen_name}: {name!r} must be one of the named bundles "
                                      f"with task {' or '.join(task)}")
        valid, _, _ = select_examples(first.config, None, split="valid")
        valid = [e for e in valid if e.response][:max_examples] if max_examples else [e for e in valid if e.response]
        vq, vr = [e.text for e in valid], [e.response for e in valid]
        valid_selected = bundle_replies(bundles[sel_name], vq)
        min_familiarity = choose_min_familiarity(valid_selected.familiarity, familiarity_quantile)
        threshold = choose_retrieval_threshold(valid_selected,
                                               bundle_replies(bundles[gen_name], vq, max_new_tokens, decoding), vr,
                                               min_familiarity)
        texts, paths = hybrid(replies[sel_name], replies[gen_name], threshold, min_familiarity)
        columns[HYBRID] = texts
        figures[HYBRID] = {"family": f"{sel_name} + {gen_name}", "task": "hybrid",
                           **generation_quality(questions, texts, refs, char_level=korean),
                           "retrieval_share": paths.count("retrieval") / len(paths),
                           "fallback_share": paths.count("fallback") / len(paths)}
        extra = {"hybrid": {"selection": sel_name, "generation": gen_name, "threshold": threshold,
                            "threshold_chosen_on": "valid", "min_familiarity": min_familiarity,
                            "familiarity_quantile": familiarity_quantile}}
    out = Path(out_dir)
    result = {"data": str(data_path), "split": split_name, "n_questions": len(questions), "figures": figures,
              "decoding": dict(decoding or {}), **extra, "table": [{"question": q, "reference": r, **{c: columns[c][i] for c in columns}}
                                 for i, (q, r) in enumerate(zip(questions, refs, strict=True)) if i < n]}
    atomic_write_json(out / "replies.json", result)
    atomic_write_text(out / "replies.md", _markdown(result, list(columns)))
    atomic_write_text(out / "replies.html", _html(result, list(columns)))
    if hybrid_of is not None:
        # The served form of the hybrid column: `chatforge serve --model NAME=BUNDLE ... --policy policy.yaml`.
        guard = {} if min_familiarity is None else {"min_familiarity": min_familiarity}
        atomic_write_text(out / "policy.yaml", yaml.safe_dump({
            "retriever": hybrid_of[0], **guard, "retrieval_threshold": threshold, "generate": True,
            "generator": hybrid_of[1], "fallback_reply": DEFAULT_FALLBACK}, allow_unicode=True, sort_keys=False))
    logger.info("reply table written to %s", out)
    return result


_FIGURE_COLUMNS = ("chrf", "bleu", "distinct_1", "distinct_2", "avg_length", "repeat_3_rate", "identical_rate")


def _markdown(result: dict, names: list[str]) -> str:
    fig = result["figures"]
    # Questions, replies, model names and the data file's name are data: md_text/_md_table escape them, so a
    # reply holding `|`, a newline, a backtick or `<script>` stays the text of its own cell.
    lines = [f"# Replies on {md_text(Path(result['data']).name)} ({md_text(result['split'])}, "
             f"{result['n_questions']} questions)", "",
             _md_table(["model", *_FIGURE_COLUMNS], [[n, *(fig[n][k] for k in _FIGURE_COLUMNS)] for n in names])]
    if "hybrid" in result:
        h = result["hybrid"]
        guard = ("" if h.get("min_familiarity") is None else
                 f"the fallback reply when the message's familiarity < {h['min_familiarity']:.3f} (the "
                 f"{h['familiarity_quantile']:.1%} quantile of valid; {fig[HYBRID]['fallback_share']:.1%} here), else ")
        lines += ["", f"hybrid: {guard}{md_text(h['selection'])} when its score >= {h['threshold']:.4f} (chosen on "
                  f"valid), else {md_text(h['generation'])}; retrieval answered {fig[HYBRID]['retrieval_share']:.1%}."]
    lines += ["", _md_table(["question", "reference", *names],
                            [[r["question"], r["reference"], *(r[n] for n in names)] for r in result["table"]]), ""]
    return "\n".join(lines)


def _html(result: dict, names: list[str]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in ("question", "reference", *names))
    rows = "\n".join("<tr>" + "".join(f"<td>{esc(str(r[k]))}</td>" for k in ("question", "reference", *names))
                     + "</tr>" for r in result["table"])
    fig = result["figures"]
    fhead = "".join(f"<th>{esc(h)}</th>" for h in ("model", *_FIGURE_COLUMNS))
    frows = "\n".join("<tr><td>" + esc(n) + "</td>" + "".join(f"<td>{fig[n][k]:.4f}</td>" for k in _FIGURE_COLUMNS)
                      + "</tr>" for n in names)
    title = esc(f"Replies on {Path(result['data']).name} ({result['split']})")
    return (f"<!doctype html>\n<html lang=\"ko\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;white-space:pre-wrap}</style></head><body>"
            f"<h1>{title}</h1><table><tr>{fhead}</tr>\n{frows}</table>"
            f"<table><tr>{head}</tr>\n{rows}</table></body></html>\n")
