"""CLINC150 benchmark of the XGBoost TF-IDF baseline (Larson et al. 2019, "Full" setting).

Trains on ``train`` (+ ``oos_train`` as a 151st class unless --no-oos-train), evaluates on
``val`` + ``oos_val`` (the official test split is not in ../shared/data), and prints in-scope
accuracy, OOS recall and training time; writes a JSON result under runs/bench/ (``--publish``: benchmarks/results/).

With ``--oos-threshold auto`` the oos probability threshold is *cross-fitted*: val is split in two
halves (every other example of each intent), the threshold chosen on one half (criterion: in-scope
accuracy + OOS recall, see chatforge.evaluation.metrics.choose_oos_threshold) is applied to the other,
so no reported prediction used its own label. Early stopping is off (fixed n_estimators) for the same
reason. The defaults are tuned to finish in a few minutes on 2 CPU cores (see --help).

    python benchmarks/clinc_xgboost.py [--oos-threshold auto|none|0.5] [--no-oos-train]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

from chatforge.baselines.xgboost import XGBoostConfig, XGBoostTextClassifier
from chatforge.evaluation.metrics import apply_oos_threshold, choose_oos_threshold, oos_metrics
from chatforge.evaluation.report import atomic_write_json, write_classification_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the _output module beside this script
from _output import add_output_options, output_path  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "clinc150" / "data_full_trainval.json"
OOS = "oos"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--no-oos-train", action="store_true", help="train on in-scope intents only")
    ap.add_argument("--oos-threshold", default="auto", help="'auto' (cross-fitted on val), 'none', or a float")
    ap.add_argument("--n-estimators", type=int, default=150)
    ap.add_argument("--max-depth", type=int, default=4)
    ap.add_argument("--max-features", type=int, default=2000, help="per vectorizer (word and char)")
    ap.add_argument("--max-bin", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=0.3)
    ap.add_argument("--n-jobs", type=int, default=2)
    add_output_options(ap, "clinc_xgboost.json")
    ap.add_argument("--report-dir", type=Path, default=None, help="also write a full classification report here")
    args = ap.parse_args()
    args.out = output_path(args, "clinc_xgboost.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if not args.data.is_file():
        raise SystemExit(f"CLINC150 not found at {args.data} (see ../shared/data/README.md)")
    data = json.loads(args.data.read_text(encoding="utf-8"))
    train = data["train"] + ([] if args.no_oos_train else data["oos_train"])
    val = data["val"] + data["oos_val"]
    cfg = XGBoostConfig(
        n_estimators=args.n_estimators, max_depth=args.max_depth, max_features=args.max_features,
        max_bin=args.max_bin, learning_rate=args.learning_rate, n_jobs=args.n_jobs, early_stopping_rounds=0,
    )

    from chatforge.runtime import cpu_info

    machine_before = cpu_info()
    t0 = time.perf_counter()
    model = XGBoostTextClassifier(cfg).fit([t for t, _ in train], [y for _, y in train])
    train_s = time.perf_counter() - t0
    texts, y_true = [t for t, _ in val], [y for _, y in val]
    t0 = time.perf_counter()
    probs = model.predict_proba(texts)
    predict_s = time.perf_counter() - t0

    plain = apply_oos_threshold(probs, model.labels, 0.0, OOS)  # argmax
    results = {"no_threshold": oos_metrics(y_true, plain, OOS)}
    y_pred = plain
    if args.oos_threshold != "none":
        if args.oos_threshold == "auto":
            # Two halves: every other example of each intent (deterministic, stratified).
            seen: dict[str, int] = {}
            half = []
            for y in y_true:
                half.append(seen.get(y, 0) % 2)
                seen[y] = seen.get(y, 0) + 1
            half = np.array(half)
            y_pred, thresholds = list(plain), []
            for h in (0, 1):
                tune, apply = np.flatnonzero(half == h), np.flatnonzero(half != h)
                t, _ = choose_oos_threshold(probs[tune], [y_true[i] for i in tune], model.labels, OOS)
                thresholds.append(t)
                for i, p in zip(apply, apply_oos_threshold(probs[apply], model.labels, t, OOS), strict=True):
                    y_pred[i] = p
        else:
            thresholds = [float(args.oos_threshold)]
            y_pred = apply_oos_threshold(probs, model.labels, thresholds[0], OOS)
        results["threshold"] = {**oos_metrics(y_true, y_pred, OOS), "thresholds": thresholds}

    accuracy = float(np.mean([a == b for a, b in zip(y_true, y_pred, strict=True)]))
    result = {
        "benchmark": "clinc150_full_val",
        "model": "xgboost_tfidf",
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "oos_train": not args.no_oos_train,
        "oos_threshold": args.oos_threshold,
        "n_train": len(train),
        "n_val": len(val),
        "n_features": model._features_.n_features,
        "train_seconds": round(train_s, 1),
        "predict_seconds": round(predict_s, 2),
        "accuracy_all_val": accuracy,
        "results": results,
        "machine": {"cpus_used": args.n_jobs, "platform": platform.platform(), "python": platform.python_version(),
                    "cpu_before": machine_before, "cpu_after": cpu_info()},  # model, flags, CPUs, load
    }
    atomic_write_json(args.out, result)
    if args.report_dir is not None:
        write_classification_report(args.report_dir, y_true, y_pred, probs, model.labels, texts, oos_label=OOS,
                                    title="CLINC150 val, XGBoost TF-IDF baseline")
    for name, m in results.items():
        print(f"{name:>13}: in-scope accuracy {m['in_scope_accuracy']:.4f}  OOS recall {m['oos_recall']:.4f}"
              f"  OOS precision {m['oos_precision'] or 0:.4f}")
    print(f"training time {train_s:.1f} s on {args.n_jobs} threads ({machine_before['model_name']}, load "
          f"{machine_before['load_average']} -> {result['machine']['cpu_after']['load_average']}); wrote {args.out}")


if __name__ == "__main__":
    main()
