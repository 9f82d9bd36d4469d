"""Extra question->answer signals for the response-selection ranker (issue 17), measured on VALIDATION.

Reproduces the shipped ranker's cross-fitted training lists (same folds, same draws as
``cross_fit_features``) and its validation candidate lists (``selection_candidates``, the benchmark's seed),
then adds candidate feature columns, each computed out-of-fold for the training lists (a model trained on
the other folds only) and, for validation, by a model trained on the whole training split:

- ``bilinear``: a learned low-rank match score q^T W_q^T W_a c over char_wb 1-3-gram TF-IDF vectors
  (two linear maps, trained with in-batch softmax over distinct answers; a DSSM-style neural matcher
  that trains in seconds on CPU);
- ``pairlr``: a logistic regression on hashed (question char n-gram, answer char n-gram) pairs, true pairs
  against random answers (the prototype of ``ranker_pair_lr``);
- ``label``: p(label | q) . p(label | c) from two linear label classifiers (the prototype of
  ``ranker_label_model``);
- ``s2s``: per-token log-likelihoods under two small Transformer encoder-decoders (``chatforge.modules``, 2+2
  pre-LN layers, d_model 128, ``epochs``) trained from scratch on the pairs: forward log p(c | q), backward
  log p(q | c) (the MMI direction of Li et al. 2016), forward minus the answer's prior log p(c) (read from a lone
  ``<unk>`` question), and the prior: four columns;
- ``a+b``: both columns. Results: benchmarks/results/selection-experiments.json.

Run:  PYTHONPATH=src nice -n 10 .venv/bin/python benchmarks/selection_experiments.py --variants base,label+pairlr \\
          [--train-seed S] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from chatforge.baselines.retrieval.ranker import FeatureIndex, PairRanker, _pick, draw_lists, pair_features
from chatforge.config import load_config
from chatforge.evaluation.metrics import selection_candidates, true_rank
from chatforge.training.run import load_splits, selection_seed

log = logging.getLogger("selection_experiments")


def cross_fit_lists(questions, answers, labels, cfg):
    """Same folds and draws as ranker.cross_fit_features, also returning each fold's inside indices and lists."""
    rng = np.random.default_rng(cfg.seed)
    distinct_q = sorted(set(questions))
    fold_of = dict(zip(distinct_q, rng.permutation(len(distinct_q)) % cfg.ranker_folds, strict=True))
    fold = np.asarray([fold_of[q] for q in questions])
    out = []
    for f in range(cfg.ranker_folds):
        inside, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        index = FeatureIndex.fit(_pick(questions, inside), _pick(answers, inside),
                                 _pick(labels, inside) if labels is not None else None, cfg,
                                 sorted(set(labels)) if labels is not None else None)
        pairs = list(dict.fromkeys(zip(_pick(questions, held), _pick(answers, held), strict=True)))
        hq, ha = [p[0] for p in pairs], [p[1] for p in pairs]
        lists = draw_lists(ha, cfg.ranker_negatives + 1, rng)
        x = pair_features(index, hq, lists, cfg.ranker_neighbours, cfg.ranker_reverse, cfg.neighbour_temperature)
        out.append({"inside": inside, "hq": hq, "lists": lists, "x": x})
    return out


# -- bilinear matcher --------------------------------------------------------------------------------------


class Bilinear:
    def __init__(self, dim=128, epochs=10, batch=256, lr=3e-3, temperature=0.05, seed=0, ngram=(1, 3)):
        self.dim, self.epochs, self.batch, self.lr, self.t, self.seed, self.ngram = dim, epochs, batch, lr, temperature, seed, ngram

    def _bags(self, texts):
        m = self.vec.transform(texts).tocsr()
        return (torch.as_tensor(m.indices, dtype=torch.long), torch.as_tensor(m.indptr[:-1], dtype=torch.long),
                torch.as_tensor(m.data, dtype=torch.float32))

    def _enc(self, emb, texts):
        i, o, w = self._bags(texts)
        return F.normalize(emb(i, o, per_sample_weights=w), dim=-1)

    def fit(self, questions, answers):
        from sklearn.feature_extraction.text import TfidfVectorizer

        torch.manual_seed(self.seed)
        pairs = list(dict.fromkeys(zip(questions, answers, strict=True)))
        qs = [p[0] for p in pairs]
        pool = sorted({p[1] for p in pairs})
        aid = {a: i for i, a in enumerate(pool)}
        ans = torch.as_tensor([aid[p[1]] for p in pairs])
        self.vec = TfidfVectorizer(analyzer="char_wb", ngram_range=self.ngram, sublinear_tf=True, min_df=2)
        self.vec.fit(qs + pool)
        v = len(self.vec.vocabulary_)
        self.eq = torch.nn.EmbeddingBag(v, self.dim, mode="sum")
        self.ea = torch.nn.EmbeddingBag(v, self.dim, mode="sum")
        params = list(self.eq.parameters()) + list(self.ea.parameters())
        opt = torch.optim.Adam(params, lr=self.lr)
        n = len(qs)
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, self.batch):
                b = perm[s : s + self.batch]
                if len(b) < 2:
                    continue
                uniq, inv = torch.unique(ans[b], return_inverse=True)
                q = self._enc(self.eq, [qs[int(i)] for i in b])
                a = self._enc(self.ea, [pool[int(j)] for j in uniq])
                loss = F.cross_entropy(q @ a.T / self.t, inv)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return self

    @torch.inference_mode()
    def scores(self, questions, candidates):
        """Per question, cos(W_q q, W_a c) for its candidate list."""
        distinct = sorted({c for cs in candidates for c in cs})
        cid = {c: i for i, c in enumerate(distinct)}
        qv, cv = self._enc(self.eq, list(questions)), self._enc(self.ea, distinct)
        s = (qv @ cv.T).numpy()
        return np.concatenate([s[i, [cid[c] for c in cs]] for i, cs in enumerate(candidates)])


class PairLogistic:
    """Logistic regression on hashed (question char n-gram, answer char n-gram) pairs: true pairs vs answers
    drawn at random (``negatives`` per pair); the score is the margin."""

    def __init__(self, negatives=5, bits=22, ngram=(2, 2), alpha=1e-6, epochs=5, seed=0):
        self.negatives, self.bits, self.ngram, self.alpha, self.epochs, self.seed = negatives, bits, ngram, alpha, epochs, seed

    def _x(self, questions, candidates):
        import scipy.sparse as sp

        bq = self.qv.transform(questions).tocsr()
        bc = self.av.transform(candidates).tocsr()
        va = len(self.av.vocabulary_)
        rows, cols = [], []
        for i in range(len(questions)):
            qi = bq.indices[bq.indptr[i] : bq.indptr[i + 1]]
            ci = bc.indices[bc.indptr[i] : bc.indptr[i + 1]]
            h = (qi[:, None].astype(np.int64) * va + ci[None, :]).ravel() % (1 << self.bits)
            rows.append(np.full(len(h), i))
            cols.append(h)
        r, c = np.concatenate(rows), np.concatenate(cols)
        m = sp.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(len(questions), 1 << self.bits))
        m.sum_duplicates()
        m.data[:] = 1.0
        n = np.sqrt(np.asarray(m.sum(1)).ravel() + 1.0)
        return sp.diags(1.0 / n) @ m

    def fit(self, questions, answers):
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.linear_model import SGDClassifier

        pairs = list(dict.fromkeys(zip(questions, answers, strict=True)))
        qs, ans = [p[0] for p in pairs], [p[1] for p in pairs]
        kw = {"analyzer": "char_wb", "ngram_range": self.ngram, "binary": True, "min_df": 2}
        self.qv, self.av = CountVectorizer(**kw).fit(qs), CountVectorizer(**kw).fit(ans)
        rng = np.random.default_rng(self.seed)
        pool = sorted(set(ans))
        nq, nc, y = list(qs), list(ans), [1] * len(qs)
        for _ in range(self.negatives):
            for q, a in zip(qs, ans, strict=True):
                c = pool[int(rng.integers(len(pool)))]
                if c != a:
                    nq.append(q)
                    nc.append(c)
                    y.append(0)
        self.clf = SGDClassifier(loss="log_loss", alpha=self.alpha, max_iter=self.epochs, tol=None,
                                 random_state=self.seed).fit(self._x(nq, nc), np.asarray(y))
        return self

    def scores(self, questions, candidates):
        fq = [q for q, cs in zip(questions, candidates, strict=True) for _ in cs]
        fc = [c for cs in candidates for c in cs]
        return self.clf.decision_function(self._x(fq, fc))


class LabelAgreement:
    """ChatbotData's 0/1/2 label predicted from the question text and from the answer text by two linear models
    (char_wb 1-3-gram TF-IDF + logistic regression); the score is p(label | q) . p(label | c)."""

    def __init__(self, vectors=False):
        self.vectors = vectors

    def fit(self, questions, answers, labels):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        def mk():
            return make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=2),
                                 LogisticRegression(C=4.0, max_iter=1000))

        self.q, self.a = mk().fit(questions, labels), mk().fit(answers, labels)
        return self

    def scores(self, questions, candidates):
        distinct = sorted({c for cs in candidates for c in cs})
        cid = {c: i for i, c in enumerate(distinct)}
        pq, pc = self.q.predict_proba(list(questions)), self.a.predict_proba(distinct)
        if self.vectors:  # both probability vectors as columns: the trees find the interactions themselves
            return np.concatenate([np.c_[np.repeat(pq[i][None], len(cs), 0), pc[[cid[c] for c in cs]]]
                                   for i, cs in enumerate(candidates)])
        return np.concatenate([pc[[cid[c] for c in cs]] @ pq[i] for i, cs in enumerate(candidates)])


class _PairSeq2Seq(torch.nn.Module):
    def __init__(self, vocab, pad, d=128, heads=4, layers=2, ff=512, dropout=0.1, max_len=64):
        from chatforge.modules.embeddings import SinusoidalPositionalEmbedding, TokenEmbedding
        from chatforge.modules.transformer_layers import TransformerDecoder, TransformerEncoder

        super().__init__()
        self.pad = pad
        self.embed = TokenEmbedding(vocab, d, padding_idx=pad)
        self.positions = SinusoidalPositionalEmbedding(max_len, d)
        self.dropout = torch.nn.Dropout(dropout)
        self.encoder = TransformerEncoder(layers, d, heads, ff, dropout, "relu", True)
        self.decoder = TransformerDecoder(layers, d, heads, ff, dropout, "relu", True)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, src, tgt_in):
        from chatforge.modules.attention import causal_mask, padding_mask

        mask = padding_mask(src, self.pad)
        memory = self.encoder(self.dropout(self.embed(src) + self.positions(src.size(1))), mask)
        y = self.dropout(self.embed(tgt_in) + self.positions(tgt_in.size(1)))
        return self.head(self.decoder(y, memory, self_mask=causal_mask(tgt_in.size(1)), memory_mask=mask))


class Seq2SeqLikelihood:
    """Forward (q -> a) and backward (a -> q) encoder-decoders; ``scores`` gives four columns per pair: mean log
    p(c | q), mean log p(q | c), (log p(c | q) - log p(c)) / |c| and log p(c) / |c| (p(c): the forward model
    reading a lone <unk>)."""

    def __init__(self, epochs=6, batch=64, lr=2e-3, max_len=32, vocab=4000, seed=0):
        self.epochs, self.batch, self.lr, self.max_len, self.vocab, self.seed = epochs, batch, lr, max_len, vocab, seed

    def _ids(self, texts):
        return [self.tok.encode(t)[: self.max_len - 1] or [self.tok.unk_id] for t in texts]

    def _batch(self, src, tgt):
        pad, bos, eos = self.tok.pad_id, self.tok.bos_id, self.tok.eos_id
        s = torch.full((len(src), max(map(len, src))), pad, dtype=torch.long)
        width = max(map(len, tgt)) + 1
        t_in = torch.full((len(tgt), width), pad, dtype=torch.long)
        t_out = torch.full((len(tgt), width), -100, dtype=torch.long)
        for i, (a, b) in enumerate(zip(src, tgt, strict=True)):
            s[i, : len(a)] = torch.tensor(a)
            t_in[i, : len(b) + 1] = torch.tensor([bos, *b])
            t_out[i, : len(b) + 1] = torch.tensor([*b, eos])
        return s, t_in, t_out

    def fit(self, questions, answers):
        from chatforge.tokenizer import Tokenizer

        pairs = list(dict.fromkeys(zip(questions, answers, strict=True)))
        qs, ans = [p[0] for p in pairs], [p[1] for p in pairs]
        self.tok = Tokenizer.train(qs + sorted(set(ans)), vocab_size=self.vocab, on_vocab_too_large="lower")
        q_ids, a_ids = self._ids(qs), self._ids(ans)
        self.nets = {}
        for direction, (src, tgt) in (("forward", (q_ids, a_ids)), ("backward", (a_ids, q_ids))):
            torch.manual_seed(self.seed)
            net = _PairSeq2Seq(self.tok.vocab_size, self.tok.pad_id)
            n = len(src)
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, self.lr, total_steps=self.epochs * -(-n // self.batch),
                                                        pct_start=0.1)
            g = torch.Generator().manual_seed(self.seed)
            for epoch in range(self.epochs):
                net.train()
                perm = torch.randperm(n, generator=g)
                total = 0.0
                for start in range(0, n, self.batch):
                    b = perm[start : start + self.batch].tolist()
                    s, t_in, t_out = self._batch([src[i] for i in b], [tgt[i] for i in b])
                    logits = net(s, t_in)
                    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), t_out.reshape(-1), ignore_index=-100)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += loss.item() * len(b)
                log.info("s2s %s epoch %d: loss %.3f", direction, epoch + 1, total / n)
            net.eval()
            self.nets[direction] = net
        return self

    @torch.inference_mode()
    def _ll(self, net, src, tgt, bs=1024):
        total, count = np.zeros(len(src)), np.zeros(len(src))
        order = np.argsort([len(a) + len(b) for a, b in zip(src, tgt, strict=True)], kind="stable")
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            s, t_in, t_out = self._batch([src[i] for i in idx], [tgt[i] for i in idx])
            logp = torch.log_softmax(net(s, t_in).float(), -1)
            keep = t_out != -100
            tok = logp.gather(-1, t_out.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
            total[idx], count[idx] = tok.sum(1).numpy(), keep.sum(1).numpy()
        return total, count

    def scores(self, questions, candidates):
        fq = self._ids([q for q, cs in zip(questions, candidates, strict=True) for _ in cs])
        fc = self._ids([c for cs in candidates for c in cs])
        fwd, nc = self._ll(self.nets["forward"], fq, fc)
        bwd, nq = self._ll(self.nets["backward"], fc, fq)
        prior, _ = self._ll(self.nets["forward"], [[self.tok.unk_id]] * len(fc), fc)
        return np.column_stack([fwd / nc, bwd / nq, (fwd - prior) / nc, prior / nc])


# ---------------------------------------------------------------------------------------------------------


def r1(scores, lists):
    ranks = [true_rank(s) for s in np.split(scores, np.cumsum([len(x) for x in lists])[:-1])]
    return np.asarray(ranks)


def fit_signal(kind, opts, tq, ta, tl, ix):
    """One extra signal, trained on the training pairs ``ix``."""
    q, a = _pick(tq, ix), _pick(ta, ix)
    if kind in ("label", "labelvec"):
        return LabelAgreement(kind == "labelvec").fit(q, a, _pick(tl, ix))
    if kind == "bilinear":
        return Bilinear(dim=int(opts.get("dim", 128)), epochs=int(opts.get("epochs", 10)),
                        temperature=float(opts.get("t", 0.05)), ngram=(1, int(opts.get("n", 3)))).fit(q, a)
    if kind == "pairlr":
        return PairLogistic(negatives=int(opts.get("neg", 5)), alpha=float(opts.get("alpha", 1e-6)),
                            ngram=(int(opts.get("lo", 2)), int(opts.get("n", 2))),
                            epochs=int(opts.get("epochs", 5))).fit(q, a)
    if kind == "s2s":
        return Seq2SeqLikelihood(epochs=int(opts.get("epochs", 6))).fit(q, a)
    raise ValueError(f"unknown signal {kind!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/retrieval_chatbot_kr_ranker.yaml")
    ap.add_argument("--out", default=None)
    ap.add_argument("--variants", default="base,bilinear")
    ap.add_argument("--test", action="store_true", help="also report test (only for the final choice)")
    ap.add_argument("--train-seed", type=int, default=None,
                    help="seed of the ranker's folds, training lists and trees (the benchmark lists keep the run's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    exp = load_config(args.config)
    cfg = exp.model.family_config()
    if args.train_seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.train_seed)
    train, valid, test, _ = load_splits(exp)
    tq, ta, tl = [e.text for e in train], [e.response for e in train], [e.label for e in train]
    t0 = time.perf_counter()
    folds = cross_fit_lists(tq, ta, tl, cfg)
    index = FeatureIndex.fit(tq, ta, tl, cfg)
    pool = set(index.pool)
    evals = {}
    splits = [("valid", valid)] + ([("test", test)] if args.test else [])
    for name, ex in splits:
        q, a = [e.text for e in ex], [e.response for e in ex]
        for k in (10, 100):
            lists = selection_candidates(a, k, selection_seed(exp.seed, name))
            x = pair_features(index, q, lists, cfg.ranker_neighbours, cfg.ranker_reverse, cfg.neighbour_temperature)
            evals[(name, k)] = {"q": q, "lists": lists, "x": x, "novel": np.asarray([x_ not in pool for x_ in a])}
    log.info("base features %.1f s", time.perf_counter() - t0)
    results = {}
    for variant in args.variants.split(","):
        t1 = time.perf_counter()
        extra_train, extra_eval = [], {}
        if variant != "base":
            cols_train, cols_eval = [], {key: [] for key in evals}
            for part in variant.split("+"):  # several signals: one column each
                kind, _, arg = part.partition(":")
                opts = dict(kv.split("=") for kv in arg.split(";") if kv)
                cols_train.append(np.concatenate([fit_signal(kind, opts, tq, ta, tl, f["inside"]).scores(f["hq"], f["lists"])
                                                  for f in folds]))
                m = fit_signal(kind, opts, tq, ta, tl, np.arange(len(tq)))
                for key, e in evals.items():
                    cols_eval[key].append(m.scores(e["q"], e["lists"]))
            extra_train = [np.column_stack(cols_train)]
            extra_eval = {key: np.column_stack(c) for key, c in cols_eval.items()}
        x = np.concatenate([f["x"] for f in folds])
        if extra_train:
            x = np.concatenate([x, np.concatenate(extra_train)], axis=1)
        groups = np.asarray([len(lst) for f in folds for lst in f["lists"]])
        y = np.concatenate([np.r_[1.0, np.zeros(g - 1)] for g in groups])
        ranker = PairRanker(cfg.ranker, cfg.ranker_trees, cfg.ranker_depth, cfg.ranker_lr, cfg.seed, 2).fit(x, y, groups)
        res = {"seconds": round(time.perf_counter() - t1, 1)}
        for (name, k), e in evals.items():
            xe = np.concatenate([e["x"], extra_eval[(name, k)]], axis=1) if extra_eval else e["x"]
            ranks = r1(ranker.predict(xe), e["lists"])
            res[f"{name}_r1_of_{k}"] = float((ranks == 0).mean())
            res[f"{name}_r1_of_{k}_novel"] = float((ranks[e["novel"]] == 0).mean())
            res[f"{name}_r1_of_{k}_in_pool"] = float((ranks[~e["novel"]] == 0).mean())
            if extra_eval:  # the extra signal alone
                ranks = r1(extra_eval[(name, k)][:, 0], e["lists"])
                res[f"{name}_r1_of_{k}_feature_alone"] = float((ranks == 0).mean())
        results[variant] = res
        log.info("%s: %s", variant, res)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
            fh.write("\n")


if __name__ == "__main__":
    main()
