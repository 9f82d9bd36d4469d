"""Which development split predicts CLINC150's val list? The linear SVM under several ways of holding out 20 %.

Issue 18 asks for a development test held out of ``train`` + ``oos_train`` that predicts how a model does on data
it has not seen. A dev split drawn at random (``data.dev_split: hashed``) scored about 3 points easier than val, and
than the official test list, for every model. CLINC150's lists are in collection order: one writer's paraphrases
of a prompt follow each other, so a randomly held-out query nearly always has a sibling by the same writer in
training. This script trains ``configs/linear_svm_clinc150.yaml`` (the product's own SVM, ``oos.policy: train``)
once per way of holding out ``--dev-fraction`` of each label and reports dev and val in-scope accuracy side by side:

- ``hashed``, ``data.dev_seed`` 0, 1, 2 (the old default), and grouped near-duplicates (``dev_group_similarity``);
- ``tail``: each label's last examples in file order (``data.dev_split: tail``, what the configs use now);
- ``head``: each label's first examples (one cut, like the tail; built here, not a config option);
- ``block``: a contiguous run at a seeded position per label (two cuts; built here, seeds 0, 1, 2).

The SVM trains in seconds, so every variant is one fit; a split that predicts val should give a dev-val gap near 0.
Writes ``<out>.json`` and ``<out>.md`` (default ``runs/clinc150-dev-splits/dev-splits``, outside the tracked tree).

    python benchmarks/clinc150_dev_splits.py [--dev-fraction 0.2] [--out runs/clinc150-dev-splits/dev-splits]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from chatforge.bench.machine import cpu_info, lscpu_model
from chatforge.bundle import build_from_config
from chatforge.config import load_config
from chatforge.data import Example
from chatforge.evaluation.metrics import oos_metrics
from chatforge.evaluation.report import atomic_write_json, atomic_write_text
from chatforge.training.run import load_splits

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "clinc150" / "data_full_trainval.json"
log = logging.getLogger("clinc150_dev_splits")


def contiguous(examples: list[Example], fraction: float, start) -> tuple[list[Example], list[Example]]:
    """(kept, held out): per label, ``round(fraction * n)`` consecutive examples from ``start(n, k)``."""
    by_label: dict[str | None, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_label[e.label].append(i)
    held: set[int] = set()
    for idx in by_label.values():
        k = round(fraction * len(idx))
        s = start(len(idx), k)
        held.update(idx[s:s + k])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def variants(fraction: float) -> list[tuple[str, list[str], object]]:
    """(name, config overrides, custom hold-out or None)."""
    out: list[tuple[str, list[str], object]] = [
        (f"hashed, dev_seed {s}", ["data.dev_split=hashed", f"data.dev_seed={s}"], None) for s in (0, 1, 2)]
    out.append(("hashed, near-duplicates >= 0.85 together",
                ["data.dev_split=hashed", "data.dev_group_similarity=0.85"], None))
    out.append(("tail (data.dev_split: tail)", ["data.dev_split=tail"], None))
    out.append(("head (first examples)", [], lambda n, k: 0))
    for s in (0, 1, 2):
        rng = np.random.default_rng(s)
        out.append((f"contiguous block, seed {s}", [], lambda n, k, rng=rng: int(rng.integers(0, n - k + 1))))
    return out


def fit_and_score(cfg, train: list[Example], val: list[Example], dev: list[Example]) -> dict:
    labels = sorted({str(e.label) for e in train})
    model = build_from_config(cfg, None, labels)
    t0 = time.perf_counter()
    model.fit([e.text for e in train], [e.label for e in train], None, None)
    seconds = time.perf_counter() - t0
    out = {"train_examples": len(train), "dev_examples": len(dev), "train_seconds": round(seconds, 1)}
    for name, part in (("val", val), ("dev", dev)):
        probs = np.asarray(model.predict_proba([e.text for e in part]))
        pred = [str(model.labels[i]) for i in probs.argmax(1)]
        m = oos_metrics([str(e.label) for e in part], pred, cfg.oos.label)
        out[f"{name}_in_scope_accuracy"], out[f"{name}_oos_recall"] = m["in_scope_accuracy"], m["oos_recall"]
    out["gap"] = out["dev_in_scope_accuracy"] - out["val_in_scope_accuracy"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dev-fraction", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "clinc150-dev-splits" / "dev-splits")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not DATA.is_file():
        raise SystemExit(f"CLINC150 not found at {DATA} (see ../shared/data/README.md)")
    base = ["tracking.enabled=false", "oos.policy=train", f"data.path={DATA}"]
    rows = []
    for name, overrides, start in variants(args.dev_fraction):
        if start is None:
            cfg = load_config(ROOT / "configs" / "linear_svm_clinc150.yaml",
                              [*base, f"data.dev_fraction={args.dev_fraction}", *overrides])
            train, val, dev, _ = load_splits(cfg)
        else:
            cfg = load_config(ROOT / "configs" / "linear_svm_clinc150.yaml",
                              [*base, "data.dev_fraction=0.0", "data.dev_split=hashed"])
            everything, val, _, _ = load_splits(cfg)
            train, dev = contiguous(everything, args.dev_fraction, start)
        row = {"split": name, **fit_and_score(cfg, train, val, dev)}
        log.info("%s: dev %.2f, val %.2f", name, 100 * row["dev_in_scope_accuracy"], 100 * row["val_in_scope_accuracy"])
        rows.append(row)
    machine = {"lscpu_model": lscpu_model(), "cpu": cpu_info()}
    md = ["# Which development split predicts val? (linear SVM, CLINC150)", "",
          f"`configs/linear_svm_clinc150.yaml` (oos.policy: train), {100 * args.dev_fraction:.0f} % of each label "
          f"held out of train + oos_train, CPU {machine['lscpu_model']}.", "",
          "| dev split | dev in-scope | val in-scope | dev - val | dev OOS recall | val OOS recall |",
          "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['split']} | {100 * r['dev_in_scope_accuracy']:.2f} | {100 * r['val_in_scope_accuracy']:.2f} | "
           f"{100 * r['gap']:+.2f} | {100 * r['dev_oos_recall']:.0f} | {100 * r['val_oos_recall']:.0f} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(md) + "\n")
    atomic_write_json(args.out.with_suffix(".json"), {"rows": rows, "dev_fraction": args.dev_fraction,
                                                      "machine": machine})
    print("\n".join(md))  # noqa: T201  (a script's output)


if __name__ == "__main__":
    main()
