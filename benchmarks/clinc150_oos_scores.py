"""Out-of-scope scores of one classifier bundle on CLINC150 val and dev: max-probability, energy, max-logit.

Energy (Liu et al. 2020, "Energy-based Out-of-distribution Detection") is ``-T logsumexp(z / T)`` over the
in-scope logits ``z``: a torch classifier's logits, or for the linear SVM ``temperature * margin`` (the
logits its probabilities come from). Each score gets the bounded threshold the benchmark uses (at most ``--max-in-scope-drop`` of
in-scope accuracy, the exact search of ``choose_flag_threshold``): cross-fitted on val (10 folds x 10),
and fitted on all of val then applied to the run's dev split (``data.dev_fraction``).

    python benchmarks/clinc150_oos_scores.py runs/clinc150/svm-clinc150/bundle
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.special import logsumexp

from chatforge.bundle import load_bundle
from chatforge.decoding import autocast_for
from chatforge.evaluation.crossfit import cross_fit, flag_fit_apply
from chatforge.oos import apply_oos_threshold, choose_flag_threshold, oos_metrics
from chatforge.training.run import load_splits

OOS = "oos"


def logits(bundle, texts: list[str], batch_size: int = 128) -> np.ndarray:
    """(N, C) logits: the linear model's scaled margins, or a torch classifier's head output (the batching of
    ``chatforge.bundle.torch_class_probs``, without its softmax)."""
    m = bundle.model
    if bundle.family == "linear":
        return m.config.temperature * (np.asarray(m._features(texts) @ m._coef.T) + m._intercept)
    if bundle.is_estimator:
        raise SystemExit(f"a {bundle.family!r} bundle has no logits; use a linear or torch classifier")
    tok, out = bundle.tokenizer, []
    for i in range(0, len(texts), batch_size):
        seqs = [ids[: bundle.config.train.max_source_len] or [tok.unk_id] for ids in tok.encode_batch(texts[i:i + batch_size])]
        if hasattr(m, "prepare_inputs"):
            batch = m.prepare_inputs(seqs)
        else:
            x = torch.full((len(seqs), max(len(s) for s in seqs)), tok.pad_id, dtype=torch.long)
            for j, s in enumerate(seqs):
                x[j, : len(s)] = torch.tensor(s)
            batch = {"input_ids": x}
        with torch.inference_mode(), autocast_for(m):
            out.append(m(**batch).logits.float().numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--max-in-scope-drop", type=float, default=0.0025)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.1])
    args = ap.parse_args()
    bundle = load_bundle(args.bundle)
    _, val, dev, _ = load_splits(bundle.config)
    if not dev:
        raise SystemExit("the bundle's config holds out no dev split (data.dev_fraction is 0)")
    labels = list(bundle.labels)
    ins = [i for i, v in enumerate(labels) if v != OOS]
    parts = {}
    for name, part in (("val", val), ("dev", dev)):
        texts, y = [e.text for e in part], [str(e.label) for e in part]
        z = logits(bundle, texts)  # (N, C)
        p = np.exp(z - logsumexp(z, axis=1, keepdims=True))
        parts[name] = (apply_oos_threshold(p, labels, 0.0, OOS), p, z, y)
    scores = {"max-probability": lambda p, z, t: 1.0 - p[:, ins].max(axis=1),
              "energy": lambda p, z, t: -t * logsumexp(z[:, ins] / t, axis=1),
              "max-logit": lambda p, z, t: -z[:, ins].max(axis=1)}
    print("| score | T | val (cross-fitted) | dev |\n|---|---|---|---|")  # noqa: T201  (a script's output)
    for t in args.temperatures:
        for name, f in scores.items():
            (mv, pv, zv, yv), (md, pd, zd, yd) = parts["val"], parts["dev"]
            sv, sd = f(pv, zv, t), f(pd, zd, t)
            cf = cross_fit(yv, flag_fit_apply(mv, sv, yv, OOS, args.max_in_scope_drop), OOS, 10, 10)
            thr, _ = choose_flag_threshold(mv, sv, yv, OOS, max_in_scope_drop=args.max_in_scope_drop)
            d = oos_metrics(yd, [OOS if q >= thr else x for x, q in zip(md, sd, strict=True)], OOS)
            print(f"| {name} | {t:g} | {100 * cf['in_scope_accuracy']:.2f} / {100 * cf['oos_recall']:.1f} "  # noqa: T201
                  f"| {100 * d['in_scope_accuracy']:.2f} / {100 * d['oos_recall']:.1f} |")


if __name__ == "__main__":
    main()
