"""Out-of-scope scores of one classifier bundle on CLINC150 val and dev: max-probability, energy, max-logit, and
nearest-neighbour distance in the model's feature space.

Energy (Liu et al. 2020, "Energy-based Out-of-distribution Detection") is ``-T logsumexp(z / T)`` over the
in-scope logits ``z``: a torch classifier's logits, or for the linear SVM ``temperature * margin`` (the
logits its probabilities come from). The nearest-neighbour score (Sun et al. 2022, "Out-of-Distribution
Detection with Deep Nearest Neighbors") is one minus the cosine similarity to the k-th nearest in-scope
training example (the run's own training split, dev held out), for k in ``--knn`` (both reported; none chosen):
on a torch classifier's feature space (the vector its head reads), on the linear model's TF-IDF vectors. Each
score gets the bounded threshold the benchmark uses (at most ``--max-in-scope-drop`` of
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


def features(bundle, texts: list[str]) -> np.ndarray:
    """(N, D) unit vectors: what a torch classifier's head reads (dense), or the linear model's TF-IDF rows (sparse)."""
    m = bundle.model
    if bundle.family == "linear":
        from sklearn.preprocessing import normalize

        return normalize(m._features(texts)).astype(np.float32)  # sparse: a dense TF-IDF bank is GBs
    else:
        head = getattr(m, "head", None) or getattr(m, "classifier", None)
        if not isinstance(head, torch.nn.Linear):
            raise SystemExit(f"no linear head found on a {bundle.family!r} classifier")
        seen: list[np.ndarray] = []
        hook = head.register_forward_pre_hook(lambda _mod, args: seen.append(args[0].float().numpy()))
        try:
            logits(bundle, texts)
        finally:
            hook.remove()
        x = np.concatenate(seen)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_score(bank: np.ndarray, x: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """1 - cosine similarity to the k-th most similar row of ``bank`` (unit rows), per row of ``x``."""
    out = []
    for i in range(0, x.shape[0], chunk):  # x may be sparse, which has no len()
        sims = x[i:i + chunk] @ bank.T  # (n, M)
        sims = np.asarray(sims.toarray() if hasattr(sims, "toarray") else sims)
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]  # the k-th largest similarity
        out.append(1.0 - kth)
    return np.concatenate(out)


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


def score_rows(bundle_dir, max_in_scope_drop: float = 0.0025, temperatures=(1.0, 0.1), knn=(1, 10)) -> list[dict]:
    """One row per score: name, setting, and (in-scope accuracy, OOS recall) under the bounded threshold,
    cross-fitted on val (10 folds x 10) and fitted on all of val then applied to dev."""
    bundle = load_bundle(bundle_dir)
    train, val, dev, _ = load_splits(bundle.config)
    if not dev:
        raise SystemExit("the bundle's config holds out no dev split (data.dev_fraction is 0)")
    labels = list(bundle.labels)
    ins = [i for i, v in enumerate(labels) if v != OOS]
    bank = features(bundle, [e.text for e in train if str(e.label) != OOS])  # in-scope training examples
    parts, near = {}, {}
    for name, part in (("val", val), ("dev", dev)):
        texts, y = [e.text for e in part], [str(e.label) for e in part]
        z = logits(bundle, texts)  # (N, C)
        p = np.exp(z - logsumexp(z, axis=1, keepdims=True))
        parts[name] = (apply_oos_threshold(p, labels, 0.0, OOS), p, z, y)
        x = features(bundle, texts)
        near[name] = {k: knn_score(bank, x, k) for k in knn}
    scores = {"max-probability": lambda p, z, t: 1.0 - p[:, ins].max(axis=1),
              "energy": lambda p, z, t: -t * logsumexp(z[:, ins] / t, axis=1),
              "max-logit": lambda p, z, t: -z[:, ins].max(axis=1)}
    rows = [(name, f"{t:g}", lambda part, f=f, t=t: f(parts[part][1], parts[part][2], t))
            for t in temperatures for name, f in scores.items()]
    rows += [("nearest neighbour", f"k={k}", lambda part, k=k: near[part][k]) for k in knn]
    (mv, _, _, yv), (md, _, _, yd) = parts["val"], parts["dev"]
    out = []
    for name, setting, score in rows:
        sv, sd = score("val"), score("dev")
        cf = cross_fit(yv, flag_fit_apply(mv, sv, yv, OOS, max_in_scope_drop), OOS, 10, 10)
        thr, _ = choose_flag_threshold(mv, sv, yv, OOS, max_in_scope_drop=max_in_scope_drop)
        d = oos_metrics(yd, [OOS if q >= thr else x for x, q in zip(md, sd, strict=True)], OOS)
        out.append({"score": name, "setting": setting,
                    "val_cross_fitted": [round(100 * cf["in_scope_accuracy"], 2), round(100 * cf["oos_recall"], 1)],
                    "dev": [round(100 * d["in_scope_accuracy"], 2), round(100 * d["oos_recall"], 1)]})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| score | T or k | val (cross-fitted) | dev |", "|---|---|---|---|"]
    lines += [f"| {r['score']} | {r['setting']} | {r['val_cross_fitted'][0]:.2f} / {r['val_cross_fitted'][1]:.1f} "
              f"| {r['dev'][0]:.2f} / {r['dev'][1]:.1f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--max-in-scope-drop", type=float, default=0.0025)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--knn", type=int, nargs="+", default=[1, 10], help="k of the nearest-neighbour score")
    args = ap.parse_args()
    rows = score_rows(args.bundle, args.max_in_scope_drop, args.temperatures, args.knn)
    print(markdown(rows))  # noqa: T201  (a script's output)


if __name__ == "__main__":
    main()
