"""ONNX Runtime classifier backend quality against the torch fp32 path on real data (issue 16).

For each classification bundle: CLINC150 val + oos_val (the bundle's own validation lists) through chatforge
torch fp32 (the reference), torch int8 (``load_model(..., precision="int8")``) and the ONNX Runtime
backend fp32 and int8 (``serving.backend_ort.OrtClassifier``, what ``chatforge serve --backend onnxruntime``
loads): argmax agreement of the probabilities with the reference, in-scope accuracy and out-of-scope recall
of the served answers (the bundle's oos policy applied, as Classify does), and the acceptance of issue 16
(agreement >= 99.5 %, in-scope accuracy within 0.3 points) for each ORT path against the matching chatforge
path (fp32 vs torch fp32, int8 vs torch int8) and against torch fp32.

    python benchmarks/ort_quality.py --classifier RUN/bundle [--classifier RUN2/bundle]
    python benchmarks/ort_quality.py --train W   # trains the short-budget BERT below into W first

``--train W`` runs (under nice -n 10) configs/bert_clinc150.yaml with train.epochs=4: minutes on 2 CPU cores,
not the config's full budget. Writes runs/bench/ort-quality.json (``--publish``: benchmarks/results/) with ``chatforge.runtime.cpu_info()``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the _output module beside this script
from _output import add_output_options, output_path  # noqa: E402

TRAIN = ("configs/bert_clinc150.yaml", ["train.epochs=4", "tokenizer.on_vocab_too_large=lower"])
PATHS = ("torch-fp32", "torch-int8", "ort-fp32", "ort-int8")
REFERENCE = "torch-fp32"
# each ORT path against its matching chatforge path and torch fp32; torch int8 against torch fp32 for context
MATCHING = {"ort-fp32": "torch-fp32", "ort-int8": "torch-int8", "torch-int8": "torch-fp32"}


def train(workdir: Path) -> Path:
    run = workdir / "bert-clinc150"
    if not (run / "bundle").exists():
        config, sets = TRAIN
        cmd = ["nice", "-n", "10", sys.executable, "-m", "chatforge.cli", "train", config, "--run-dir", str(run),
               "--no-progress", *[a for s in [*sets, "tracking.enabled=false"] for a in ("--set", s)]]
        subprocess.run(cmd, cwd=ROOT, check=True)
    return run / "bundle"


def compare(figures: dict[str, dict], argmax: dict) -> dict:
    """Agreement and accuracy deltas of each ORT path against torch fp32 and against the matching torch path
    (and of torch int8 against torch fp32), with issue 16's acceptance (argmax agreement >= 99.5 %, in-scope
    accuracy within 0.3 points)."""
    out = {}
    for ort_path, matching in MATCHING.items():
        for against in dict.fromkeys((matching, REFERENCE)):
            agree = float((argmax[ort_path] == argmax[against]).mean())
            delta = 100 * (figures[ort_path]["in_scope_accuracy"] - figures[against]["in_scope_accuracy"])
            out[f"{ort_path} vs {against}"] = {
                "argmax_agreement": round(agree, 5), "in_scope_accuracy_delta_points": round(delta, 3),
                "oos_recall_delta_points": round(100 * (figures[ort_path]["oos_recall"]
                                                        - figures[against]["oos_recall"]), 3),
                "argmax_agreement>=0.995": agree >= 0.995, "in_scope_accuracy_within_0.3": abs(delta) <= 0.3}
    return out


def classification_quality(bundle: Path) -> dict:
    import numpy as np

    from chatforge.inference import load_model
    from chatforge.oos import oos_metrics
    from chatforge.serving.backend_ort import OrtClassifier
    from chatforge.training.run import load_splits

    models = {"torch-fp32": load_model(bundle, "intent"), "torch-int8": load_model(bundle, "intent", precision="int8"),
              "ort-fp32": OrtClassifier(bundle, "intent", precision="fp32"),
              "ort-int8": OrtClassifier(bundle, "intent", precision="int8")}
    cfg = models[REFERENCE].bundle.config
    _, valid, _, path = load_splits(cfg)
    texts, gold = [ex.text for ex in valid], [ex.label for ex in valid]
    figures, argmax, probs_by = {}, {}, {}
    for p, m in models.items():
        preds, probs = [], []
        for i in range(0, len(texts), 64):
            batch = texts[i: i + 64]
            probs.append(m.predict_proba(batch))
            preds += [c.label for c in m.classify(batch)]
        probs_by[p] = np.concatenate(probs)
        argmax[p] = probs_by[p].argmax(1)
        met = oos_metrics(gold, preds, m.oos.label)
        figures[p] = {"in_scope_accuracy": met["in_scope_accuracy"], "oos_recall": met["oos_recall"],
                      "accuracy": float(np.mean([a == b for a, b in zip(gold, preds, strict=True)]))}
    return {
        "bundle": str(bundle), "family": cfg.model.family, "data": str(path), "split": "val + oos_val",
        "examples": len(texts), "oos_policy": models[REFERENCE].oos.serving_metadata(), **figures,
        "ort_fp32_max_abs_prob_diff": float(np.abs(probs_by["ort-fp32"] - probs_by["torch-fp32"]).max()),
        "comparisons": compare(figures, argmax),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classifier", type=Path, action="append", default=[])
    ap.add_argument("--train", type=Path, help="train the short-budget BERT bundle into this folder first")
    add_output_options(ap, "ort-quality.json")
    args = ap.parse_args()
    args.out = output_path(args, "ort-quality.json")
    os.chdir(ROOT)  # the configs' data paths are relative to the repository root

    from chatforge.runtime import configure_threads, cpu_info, set_omp_wait_policy

    set_omp_wait_policy()
    import onnxruntime
    import torch

    if args.train:
        args.classifier.append(train(args.train))
    configure_threads()
    before = cpu_info()
    cls = [classification_quality(b) for b in args.classifier]
    result = {"benchmark": "ort_quality", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine_before": before, "machine_after": cpu_info(), "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "classification": cls}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps([{k: c[k] for k in ("family", "examples", *PATHS, "comparisons")} for c in cls], indent=1))


if __name__ == "__main__":
    main()
