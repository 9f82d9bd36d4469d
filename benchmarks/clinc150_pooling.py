"""Arithmetic against geometric pooling of an ensemble's members, over every subset of its Transformer seeds.

One ensemble's figures (``clinc150_results.py --ensemble-method``) are one draw: with 3,000 in-scope queries a
0.2-point difference is six queries. This script asks whether geometric pooling (``model.method: geometric``)
beats the arithmetic mean (``average``) systematically: for each size k it pools the linear member with every
k-subset of the given Transformer runs both ways, each kind weighing the same (the seeds share theirs, as the
ensemble does), and reports the in-scope accuracy without a policy on val and on the dev split, the mean
difference and how often each way wins. Subsets share members, so they are not independent draws; the
figure says whether the sign holds across members, not a significance level.

Every run must hold out the same dev split (the script checks the labels line up). Probabilities come from
each bundle once, through ``chatforge.bundle.load_bundle``; the pooling is the ensemble's own
(``chatforge.baselines.ensemble.model.pool``).

    python benchmarks/clinc150_pooling.py --linear runs/clinc150/svm-clinc150 \\
        --transformers runs/clinc150/transformer-oe-s{0,1,2}-clinc150 [--sizes 1 2 3] [--out DIR/NAME]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

import numpy as np

from chatforge.baselines.ensemble.model import pool
from chatforge.bench.machine import cpu_info, lscpu_model
from chatforge.bundle import load_bundle
from chatforge.training.run import load_splits

log = logging.getLogger("clinc150_pooling")
OOS = "oos"
PARTS = ("val", "dev")


def member_probs(run: Path) -> tuple[list[str], dict[str, np.ndarray], dict[str, list[str]]]:
    """A run's labels, its (N, C) probabilities on val and dev, and the true labels of each."""
    bundle = load_bundle(run / "bundle" if (run / "bundle").is_dir() else run)
    _, val, dev, _ = load_splits(bundle.config)
    if not dev:
        raise SystemExit(f"{run} holds out no dev split (data.dev_fraction is 0)")
    probs, truth = {}, {}
    for name, part in zip(PARTS, (val, dev), strict=True):
        probs[name] = np.asarray(bundle.predict_proba([e.text for e in part]), dtype=np.float64)
        truth[name] = [str(e.label) for e in part]
    return list(bundle.labels), probs, truth


def in_scope_accuracy(p: np.ndarray, labels: list[str], truth: list[str]) -> float:
    pred = np.asarray(labels)[p.argmax(axis=1)]
    y = np.asarray(truth)
    ins = y != OOS
    return float(100 * (pred[ins] == y[ins]).mean())


def compare(linear: dict[str, np.ndarray], transformers: list[dict[str, np.ndarray]], labels: list[str],
            truth: dict[str, list[str]], sizes: list[int]) -> list[dict]:
    """One row per subset size: per part, the mean in-scope accuracy of each pooling and of their difference,
    and the share of subsets where geometric is ahead, level or behind."""
    rows = []
    for k in sizes:
        subsets = list(itertools.combinations(range(len(transformers)), k))
        row: dict = {"k": k, "subsets": len(subsets)}
        for part in PARTS:
            acc = {"average": [], "geometric": []}
            for subset in subsets:
                probs = [linear[part], *(transformers[i][part] for i in subset)]
                weights = [0.5] + [0.5 / k] * k
                for method in acc:
                    acc[method].append(in_scope_accuracy(pool(probs, weights, method), labels, truth[part]))
            diff = np.asarray(acc["geometric"]) - np.asarray(acc["average"])
            row[part] = {"average": round(float(np.mean(acc["average"])), 3),
                         "geometric": round(float(np.mean(acc["geometric"])), 3),
                         "difference": round(float(diff.mean()), 3),
                         "geometric_ahead": round(float(np.mean(diff > 0)), 3),
                         "level": round(float(np.mean(diff == 0)), 3),
                         "geometric_behind": round(float(np.mean(diff < 0)), 3)}
        rows.append(row)
    return rows


def markdown(rows: list[dict], runs: dict) -> str:
    lines = ["# Arithmetic against geometric pooling (CLINC150, in-scope accuracy without a policy)", "",
             f"Linear member: `{runs['linear']}`; Transformers: {', '.join(f'`{t}`' for t in runs['transformers'])}.",
             "Each subset pools the linear member (weight 0.5) with k Transformers (0.5 / k each); means over "
             "the subsets.", "",
             "| k | subsets | val: average / geometric | val: difference (ahead / level / behind) "
             "| dev: average / geometric | dev: difference (ahead / level / behind) |",
             "| ---: | ---: | --- | --- | --- | --- |"]
    for r in rows:
        cells = []
        for part in PARTS:
            p = r[part]
            cells += [f"{p['average']:.2f} / {p['geometric']:.2f}",
                      f"{p['difference']:+.2f} ({p['geometric_ahead']:.0%} / {p['level']:.0%} / "
                      f"{p['geometric_behind']:.0%})"]
        lines.append(f"| {r['k']} | {r['subsets']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--linear", type=Path, required=True, help="the linear (SVM) member's run or bundle folder")
    ap.add_argument("--transformers", type=Path, nargs="+", required=True, help="Transformer run or bundle folders")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="subset sizes (default 1 .. all)")
    ap.add_argument("--out", type=Path, default=Path("runs") / "clinc150-pooling" / "pooling",
                    help="results path without suffix (writes .md and .json)")
    args = ap.parse_args(argv)
    sizes = args.sizes or list(range(1, len(args.transformers) + 1))
    if any(not 1 <= k <= len(args.transformers) for k in sizes):
        ap.error(f"--sizes must lie in 1..{len(args.transformers)} (the number of --transformers), got {sizes}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    labels, linear, truth = member_probs(args.linear)
    transformers = []
    for run in args.transformers:
        got_labels, probs, got_truth = member_probs(run)
        if got_labels != labels or got_truth != truth:
            raise SystemExit(f"{run} has other labels or another val/dev split than {args.linear}: retrain it with "
                             "the same data.dev_* keys")
        transformers.append(probs)
        log.info("read %s", run)
    rows = compare(linear, transformers, labels, truth, sizes)
    runs = {"linear": str(args.linear), "transformers": [str(t) for t in args.transformers]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown(rows, runs), encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"runs": runs, "rows": rows, "machine": {"lscpu_model": lscpu_model(), "cpu": cpu_info()}}, indent=2),
        encoding="utf-8")
    print(markdown(rows, runs))


if __name__ == "__main__":
    main()
