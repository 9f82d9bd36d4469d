"""``chatforge evaluate``: one bundle, one data file (or split) -> one report folder.

Classification: accuracy, macro-F1, per-intent P/R/F1, confusion matrix and confidence histogram
PNGs, errors file (``evaluation.report.write_classification_report``); with an ``oos`` label, the
in-scope accuracy and OOS recall of Larson et al. 2019 (section 4), using the bundle's own oos
policy, so the numbers are the served answers'. Generation: perplexity, BLEU, distinct-1/2,
average length, sample replies (``write_generation_report``).

Every folder also gets ``evaluation.json`` (the summary ``chatforge compare`` reads: split,
headline metrics, latency per example, bundle size) and ``evaluation.md``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatforge.bundle import load_bundle
from chatforge.config import validate_config
from chatforge.data import read_examples
from chatforge.decoding import GenerationOptions, generate
from chatforge.evaluation.crossfit import cross_fit, policy_fit_apply
from chatforge.evaluation.metrics import generation_quality, selection_report
from chatforge.evaluation.report import _md_table, write_classification_report, write_generation_report
from chatforge.fileio import atomic_write_json, atomic_write_text
from chatforge.inference import Classifier
from chatforge.tasks import IGNORE_INDEX, TaskSpec, make_dataset, source_ids
from chatforge.training.run import file_sha256, load_splits, resolve_data_path, selection_seed
from chatforge.training.tracking import resolve_tracking_uri

logger = logging.getLogger(__name__)

SPLITS = ("valid", "test", "dev", "all")
SUMMARY_FILE = "evaluation.json"
HEADLINE = ("accuracy", "macro_f1", "in_scope_accuracy", "oos_recall", "oos_precision", "r1_of_10", "mrr_of_10",
            "r1_of_100", "mrr_of_100", "chrf", "bleu", "perplexity", "distinct_1", "distinct_2", "avg_length",
            "repeat_3_rate", "identical_rate")


class EvaluationError(ValueError):
    pass


@dataclass
class EvaluationResult:
    out_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def bundle_size_bytes(bundle_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(bundle_dir).rglob("*") if p.is_file())


def run_dir_of(bundle_dir: Path) -> Path | None:
    """The run folder holding this bundle (``runs/<run>/bundle``), if it is one."""
    parent = bundle_dir.resolve().parent
    return parent if bundle_dir.name == "bundle" and (parent / "config.yaml").is_file() else None


FIELDS = ("text_field", "response_field", "label_field")


def select_examples(cfg, data: str | Path | None, *, fmt: str = "auto", split: str = "valid",
                    clinc_keys: list[str] | None = None, fields: dict[str, str] | None = None) -> tuple[list, str, Path]:
    """The examples to evaluate on, a name for the split, and the data file.

    ``fields`` names the columns (keys) of the data file, e.g. ``{"text_field": "sentence"}``, in place of the
    bundle's ``data.*_field`` settings: a held-out file's headers need not be the training file's.

    ``clinc_keys`` reads exactly those lists of a CLINC150 JSON file. Otherwise the file is split
    as the bundle's config splits its training data (same seed and fractions, or the predefined
    CLINC lists), so ``--split valid`` on the training file is the run's own validation split.
    """

    if split not in SPLITS:
        raise EvaluationError(f"--split {split!r} is unknown; allowed: {', '.join(SPLITS)}")
    path = resolve_data_path(str(data)) if data is not None else resolve_data_path(cfg.data.path)
    if not path.is_file():
        raise EvaluationError(f"data file not found: {path}")
    d = cfg.data
    named = {k: v for k, v in (fields or {}).items() if v}
    unknown = sorted(set(named) - set(FIELDS))
    if unknown:
        raise EvaluationError(f"unknown field setting(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    kw = dict(text_field=d.text_field, response_field=d.response_field, label_field=d.label_field,
              context_field=d.context_field, on_error=d.on_error)
    kw.update(named)
    fmt = fmt if data is not None else d.format
    if clinc_keys:
        examples, report = read_examples(path, format=fmt, clinc_keys=tuple(clinc_keys), **kw)
        if report.format != "clinc150":  # the reader of any other format has no lists to pick: it read every row
            raise EvaluationError(f"--clinc-keys reads lists of a CLINC150 JSON file; {path} is {report.format}: "
                                  f"use --split (valid, test or all) instead")
        return examples, "+".join(clinc_keys), path
    clinc = fmt == "clinc150" or (fmt == "auto" and path.suffix.lower() == ".json")
    if split == "all" and (d.split != "predefined" or not clinc):  # a file without the predefined lists: whole
        examples, _ = read_examples(path, format=fmt, **kw)
        return examples, "all", path
    tree = cfg.to_dict()
    tree["data"].update(path=str(path), format=fmt, max_examples=None, **named)

    sub = validate_config(tree, source="evaluation data")
    train, valid, test, _ = load_splits(sub)
    if d.split == "predefined":
        if split == "test":
            raise EvaluationError("this bundle was trained on a predefined (CLINC150) split, which has no test "
                                  "split here; pass --clinc-keys, e.g. val,oos_val or test,oos_test, or --split dev "
                                  "for the part data.dev_fraction held out of its train lists")
        if split == "dev":
            if not test:
                raise EvaluationError("--split dev: this bundle's config holds nothing out of its train lists "
                                      "(data.dev_fraction is 0); retrain with data.dev_fraction, e.g. 0.1")
            return test, "dev", path
        chosen = valid if split == "valid" else train + valid + test
        return chosen, "+".join(d.valid_keys) if split == "valid" else "all", path
    if split == "dev":
        raise EvaluationError("--split dev is the part of a predefined (CLINC150) split's train lists held out by "
                              "data.dev_fraction; this bundle splits its data at random: use --split test")
    chosen = {"valid": valid, "test": test}[split]
    if not chosen:
        fraction = getattr(d, f"{split}_fraction")
        why = (f"data.{split}_fraction is 0 in the bundle's config" if not fraction else
               f"the bundle's config takes data.{split}_fraction {fraction:g} of its {len(train + valid + test)} "
               f"examples, which leaves none")
        raise EvaluationError(f"the {split} split of {path} is empty ({why}); use --split all or another data file")
    return chosen, split, path


def default_split(bundle, data: str | Path | None, clinc_keys: list[str] | None = None) -> str:
    """``--split`` when none is given: ``valid`` on the bundle's own training data (its validation split), and
    ``all`` on any other file of a bundle with a random split, whose rows it never trained on: held-out data is
    scored whole, not cut to the config's valid fraction. A predefined (CLINC150) split reads that file's
    ``valid_keys`` lists, as before."""

    if data is None or clinc_keys or bundle.config.data.split == "predefined":
        return "valid"
    path = resolve_data_path(str(data))
    if not path.is_file() or path.resolve() == resolve_data_path(bundle.config.data.path).resolve():
        return "valid"
    if file_sha256(path) == bundle.metadata.get("data_sha256"):  # a copy of the training data
        return "valid"
    logger.info("%s is not the data %s was trained on: scoring all of its rows (--split valid or test splits it as "
                "the training data was split)", path, bundle.config.name)
    return "all"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "data"


def default_out_dir(bundle_dir: Path, data_path: Path, split_name: str) -> Path:
    run = run_dir_of(bundle_dir)
    base = run if run is not None else bundle_dir.resolve().parent / f"{bundle_dir.name}-eval"
    return base / "eval" / _slug(f"{data_path.stem}-{split_name}")


def _fitted_on(bundle, data_path: Path, split_name: str) -> bool:
    """True when ``split_name`` of ``data_path`` is the validation split the bundle's oos policy was fitted on."""

    d = bundle.config.data
    valid_name = "+".join(d.valid_keys) if d.split == "predefined" else "valid"
    sha = bundle.metadata.get("data_sha256")
    return split_name == valid_name and sha is not None and sha == file_sha256(data_path)


def _fitted_count(bundle, examples, data_path: Path, split_name: str) -> int:
    """How many of ``examples`` are in the validation split the bundle's oos policy was fitted on: all of them on
    that split of the training file, else those whose (text, label) the training data's validation split holds,
    whatever file they come in (the upstream CLINC150 file repeats the ``val`` lists the configs train on)."""

    if _fitted_on(bundle, data_path, split_name):
        return len(examples)
    try:
        _, valid, _, _ = load_splits(bundle.config)
    except Exception as e:  # the training data moved or is unreadable here: only the file check above applies
        logger.debug("cannot read %s's training data to compare with its validation split: %s", bundle.config.name, e)
        return 0
    fitted = {(e.text, str(e.label)) for e in valid}
    return sum((e.text, str(e.label)) in fitted for e in examples)


def _classification(bundle, examples, out: Path, title: str, batch_size: int, cross_fit_folds: int = 0,
                    cross_fit_repeats: int = 10, in_sample: Callable[[], int] | None = None) -> tuple[dict, dict]:
    clf = Classifier(bundle, name=title)
    texts = [e.text for e in examples]
    y_true = [str(e.label) for e in examples]
    if any(e.label is None for e in examples):
        raise EvaluationError("classification evaluation needs a label for every example; the data has unlabelled rows")
    known = set(clf.labels) | {clf.oos.label}
    unknown = sorted({v for v in y_true if v not in known})
    n_unknown = sum(v not in known for v in y_true)
    if n_unknown == len(y_true):
        raise EvaluationError(
            f"none of the {len(y_true)} examples has a label this model predicts: the data's labels "
            f"({', '.join(unknown[:8])}{', ...' if len(unknown) > 8 else ''}) are not among the model's "
            f"({', '.join(clf.labels[:8])}{', ...' if len(clf.labels) > 8 else ''}); evaluate on data with its label set")
    if n_unknown:
        logger.warning("%d of %d examples have labels this model never predicts (%s): they count as errors",
                       n_unknown, len(y_true), ", ".join(unknown[:8]))
    t0 = time.perf_counter()
    batches = [clf.predict_views(texts[i : i + batch_size]) if clf.oos.needs_views
               else [clf.predict_proba(texts[i : i + batch_size])] for i in range(0, len(texts), batch_size)]
    views = [np.concatenate([b[v] for b in batches]) for v in range(len(batches[0]))] if batches else [
        np.zeros((0, len(clf.labels)))]
    probs = views[0]
    y_pred = clf.oos.decide(probs, clf.labels, texts, views)
    seconds = time.perf_counter() - t0
    has_oos = clf.oos.label in set(y_true) | set(clf.labels) or clf.oos.policy != "train"
    report = write_classification_report(out, y_true, y_pred, probs, clf.labels, texts,
                                         oos_label=clf.oos.label if has_oos else None, title=title)
    summary = {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "weighted_f1": report["weighted_f1"]}
    if n_unknown:
        summary["unknown_label_examples"] = n_unknown
    if "oos" in report:
        summary.update({k: report["oos"][k] for k in ("in_scope_accuracy", "oos_recall", "oos_precision")})
    summary["oos_policy"] = clf.oos.to_metadata()
    fits_on_valid = clf.oos.policy != "train" and bundle.config.oos.threshold is None
    n_fitted = in_sample() if in_sample is not None and fits_on_valid else 0
    if n_fitted == len(examples):
        summary["oos_policy_fitted_on_this_split"] = True
        logger.warning("the bundle's oos policy (%s) was fitted on this split, so its figures here are in-sample; "
                       "cross-fit them (--cross-fit 10) or evaluate on held-out data", clf.oos.policy)
    elif n_fitted:
        summary["oos_policy_fitted_examples"] = n_fitted
        logger.warning("%d of these %d examples are in the validation split the bundle's oos policy (%s) was fitted "
                       "on, so its figures here are partly in-sample", n_fitted, len(examples), clf.oos.policy)
    if cross_fit_folds:
        n_oos = sum(v == clf.oos.label for v in y_true)
        if n_oos == 0 or n_oos == len(y_true):
            raise EvaluationError(f"--cross-fit scores an oos policy, so the data needs both in-scope examples and "
                                  f"examples labelled {clf.oos.label!r} (found {n_oos} of {len(y_true)})")

        fit_apply = policy_fit_apply(clf.oos, views, clf.labels, texts, y_true,
                                     bundle.config.oos.max_in_scope_drop) if fits_on_valid else None
        if fit_apply is None:
            summary["cross_fitted"] = None  # nothing in the policy was fitted on validation
        else:
            summary["cross_fitted"] = cross_fit(y_true, fit_apply, clf.oos.label, cross_fit_folds, cross_fit_repeats)
    return summary, {"seconds": seconds, "report": report}


def _generation(bundle, examples, out: Path, title: str, batch_size: int, max_new_tokens: int | None) -> tuple[dict, dict]:
    cfg, tok, model = bundle.config, bundle.tokenizer, bundle.model
    missing = sum(1 for e in examples if not e.response)
    if missing:
        raise EvaluationError(f"generation evaluation needs a reference reply for every example; {missing} have none")
    spec = TaskSpec(cfg.model.task, cfg.model.family, cfg.train.max_source_len, cfg.train.max_target_len, None,
                    cfg.data.context_turns)
    ds = make_dataset(spec, examples, tok)
    nll, n_tok = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ds), batch_size):
            batch = ds.collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
            n = int((batch["labels"] != IGNORE_INDEX).sum())
            loss = model(**batch).loss  # mean over the batch's target tokens
            nll += float(loss) * n
            n_tok += n
    opts = GenerationOptions(max_new_tokens=max_new_tokens or cfg.train.max_target_len)
    t0 = time.perf_counter()
    sources = source_ids(tok, examples, cfg.train.max_source_len, cfg.data.context_turns)
    hyps = [tok.decode(generate(model, src or [tok.unk_id], opts, bos_id=tok.bos_id, eos_id=tok.eos_id))
            for src in sources]
    seconds = time.perf_counter() - t0
    refs = [e.response for e in examples]
    # Korean has no agreed word segmentation: character BLEU (see metrics.corpus_bleu).
    korean = any(re.search(r"[\uac00-\ud7a3]", r) for r in refs[:50])
    report = write_generation_report(out, [e.text for e in examples], hyps, refs, nll, n_tok,
                                     tokenize="char" if korean else "13a", title=title)
    summary = {k: report[k] for k in ("bleu", "perplexity", "distinct_1", "distinct_2", "avg_length")}
    summary["bleu_tokenize"] = report["bleu_tokenize"]
    quality = generation_quality([e.text for e in examples], hyps, refs, char_level=korean)
    summary.update({k: quality[k] for k in ("chrf", "repeat_3_rate", "identical_rate")})
    return summary, {"seconds": seconds, "report": report}


def _selection(bundle, examples, out: Path, title: str, split_name: str) -> tuple[dict, dict]:
    """R@1 of 10 / of 100 and MRR with seeded candidates (the run's own figures for the same split), and the
    reply-quality figures of the top pool answer, the reply a retrieval bot serves."""
    missing = sum(1 for e in examples if not e.response)
    if missing:
        raise EvaluationError(f"selection evaluation needs a reference reply for every example; {missing} have none")
    questions, refs = [e.text for e in examples], [e.response for e in examples]
    t0 = time.perf_counter()
    metrics = selection_report(bundle.model.score, questions, refs, selection_seed(bundle.config.seed, split_name))
    best = bundle.model.select(questions)
    seconds = time.perf_counter() - t0
    hyps = [b[0][0] for b in best]
    korean = any(re.search(r"[\uac00-\ud7a3]", r) for r in refs[:50])
    report = write_generation_report(out, questions, hyps, refs, tokenize="char" if korean else "13a", title=title)
    metrics.update(generation_quality(questions, hyps, refs, char_level=korean))
    metrics["candidates_seed"] = selection_seed(bundle.config.seed, split_name)
    return metrics, {"seconds": seconds, "report": report}


def evaluate_bundle(bundle_dir: str | Path, data: str | Path | None = None, *, fmt: str = "auto",
                    split: str | None = None, clinc_keys: list[str] | None = None, out_dir: str | Path | None = None,
                    max_examples: int | None = None, batch_size: int = 64,
                    max_new_tokens: int | None = None, track: bool = True, cross_fit: int = 0,
                    cross_fit_repeats: int = 10, fields: dict[str, str] | None = None) -> EvaluationResult:
    """Evaluate a bundle and write the report folder; see the module docstring for what is in it.

    ``data`` None means the bundle's own training data file (its ``split``); ``split`` None is
    :func:`default_split` (``valid``, or every row of a file the bundle did not train on). ``max_examples`` caps
    the examples (generation decodes one by one, so large sets are slow). ``cross_fit`` (folds, e.g.
    10; 0 = off): also report the oos policy's in-scope accuracy and OOS recall cross-fitted on these
    examples (``chatforge.evaluation.crossfit``), the honest figures when the policy was fitted on them.
    ``fields``: the data file's column names (:func:`select_examples`).
    """

    if cross_fit < 0 or cross_fit == 1 or cross_fit_repeats < 1:
        raise EvaluationError(f"--cross-fit needs at least 2 folds (10 is usual), or 0 to switch it off, and "
                              f"--cross-fit-repeats at least 1; got {cross_fit} and {cross_fit_repeats}")
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    if split is None:
        split = default_split(bundle, data, clinc_keys)
    examples, split_name, data_path = select_examples(bundle.config, data, fmt=fmt, split=split,
                                                      clinc_keys=clinc_keys, fields=fields)
    base_split = split_name  # what seeds the selection candidates: the run's own figures for that split
    if max_examples and len(examples) > max_examples:
        # named as a cut of the split: its own folder, and never ranked by `compare` as the whole split
        examples, split_name = examples[:max_examples], f"{split_name}-first{max_examples}"
    if not examples:
        raise EvaluationError(f"no examples to evaluate in {data_path} ({split_name})")
    out = Path(out_dir) if out_dir is not None else default_out_dir(bundle_dir, data_path, split_name)
    inside = bundle_dir.resolve()
    if out.resolve() == inside or inside in out.resolve().parents:
        # a bundle is what servers load and `convert` and `compare` read: reports written into it travel with it
        raise EvaluationError(f"--out {out} is inside the bundle {bundle_dir}, which is a read-only input; write the "
                              f"report elsewhere (default: {default_out_dir(bundle_dir, data_path, split_name)})")
    title = f"{bundle.config.name} on {data_path.name} ({split_name})"
    if bundle.task == "classification":
        metrics, extra = _classification(bundle, examples, out, title, batch_size, cross_fit, cross_fit_repeats,
                                         in_sample=lambda: _fitted_count(bundle, examples, data_path, split_name))
    elif bundle.task in ("generation", "lm"):
        metrics, extra = _generation(bundle, examples, out, title, batch_size, max_new_tokens)
    elif bundle.task == "selection":
        metrics, extra = _selection(bundle, examples, out, title, base_split)
    else:
        raise EvaluationError(f"bundle task {bundle.task!r} cannot be evaluated; allowed: classification, "
                              f"generation, selection")
    run = run_dir_of(bundle_dir)
    summary = {
        "bundle": str(bundle_dir.resolve()),
        "run": str(run) if run else None,
        "name": bundle.config.name,
        "family": bundle.family,
        "task": bundle.task,
        "data": str(data_path),
        "split": split_name,
        "n": len(examples),
        "metrics": metrics,
        "latency_ms_per_example": 1000.0 * extra["seconds"] / len(examples),
        "bundle_size_bytes": bundle_size_bytes(bundle_dir),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(out / SUMMARY_FILE, summary)
    rows = [(k, metrics[k]) for k in HEADLINE if k in metrics]
    if metrics.get("cross_fitted"):
        cf = metrics["cross_fitted"]
        rows += [(f"{k} (cross-fitted, {cf['folds']}-fold x {cf['repeats']}; worst)",
                  f"{cf[k]:.4f} ({cf['min_' + k]:.4f})") for k in ("in_scope_accuracy", "oos_recall")]
    notes = ["", "The oos policy was fitted on this split: its figures above are in-sample; see the cross-fitted "
             "rows (`--cross-fit 10`)."] if metrics.get("oos_policy_fitted_on_this_split") else []
    rows += [("latency per example (ms)", summary["latency_ms_per_example"]),
             ("bundle size (MB)", summary["bundle_size_bytes"] / 1e6), ("examples", len(examples))]
    detail = "report.md" if bundle.task == "classification" else "generation_report.md"  # selection: its top replies
    atomic_write_text(out / "evaluation.md", "\n".join([
        f"# {title}", "", f"bundle `{bundle_dir}` ({bundle.family}, {bundle.task})", "",
        _md_table(["metric", "value"], rows), *notes, "", f"Details: `{detail}`.", ""]))
    logger.info("evaluation of %s written to %s", bundle_dir, out)
    if track and run is not None:
        _log_to_mlflow(bundle.config, run, out)
    return EvaluationResult(out_dir=out, summary=summary, report=extra["report"])


def _log_to_mlflow(cfg, run: Path, out: Path) -> None:
    """Attach the report to the run's MLflow run when the run was tracked (best effort)."""
    id_file = run / "mlflow_run_id"
    if not id_file.is_file():
        return
    try:
        uri = resolve_tracking_uri(cfg.tracking)
        if uri is None:
            return
        # lazy: importing mlflow takes seconds; only tracked runs need it
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).log_artifacts(id_file.read_text().strip(), str(out),
                                                      artifact_path=f"evaluation/{out.name}")
    except Exception as e:  # tracking is a convenience here: the report on disk is the result
        logger.warning("could not log the evaluation to MLflow: %s", e)
