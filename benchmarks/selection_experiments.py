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
- ``xencfeat``: a discriminative cross-encoder (``CrossEncoder``: ``[CLS] question [SEP] candidate [SEP]`` with
  segment embeddings through a 2-layer pre-LN Transformer encoder from ``chatforge.modules``, d_model 128, a matching
  read-out over [CLS] and the two segments' mean states, the run's own SentencePiece tokens, trained from scratch with a listwise softmax over the true answer, 5 hard negatives
  (answers of the nearest other training questions) and 2 random ones) as one more cross-fitted column;
- ``topics``: which *kind* of answer fits the question (``AnswerTopics``): the training answers clustered by
  k-means (``k``), p(cluster | question) from a logistic regression, the candidate softly assigned to the
  clusters; the column is log p(its cluster | q);
- ``hub``: hubness / querybank normalisation (``HubNorm``: CSLS, inverted softmax, QB-Norm) with a bank of the
  index's training questions only: per space, CSLS, the candidate's hubness r_c, z-score, percentile and inverted
  softmax of cos(q, c) against cos(bank question, c) (group ``qa``), and the ``path``/``exact``/``reverse`` scores
  minus their mean over the bank (each bank question leave-own-text-out; group ``nb``); 18 columns, or 10 / 8 with
  ``cols=qa`` / ``cols=nb`` (``k`` = 10 nearest for CSLS, ``t`` = 0.05 for the inverted softmax);
- ``a+b``: both columns.

and, not a column but a re-ranker on top of the shipped ranker:

- ``xenc``: the cross-encoder trained once on the whole training split; final score = ranker margin + w * its
  score, w chosen on one seeded half of the validation questions and reported on the other half and on all of
  validation, beside the ranker alone on the same questions (``rerank_experiment``). ``cache=FILE`` keeps its
  validation scores, which ``xencfeat`` with the same settings and ``cache`` reuses for its whole-split model.

``--oof`` adds a selection figure that nothing else is chosen on and that is 18 times validation's size: each
cross-fitting fold's training lists (true answer + 19) ranked by a ranker fitted on the other folds' lists
(``train_oof_r1_of_20``).

Settings go after a colon, ``;``-separated: ``xenc:epochs=4;hard=5;rand=2;cache=/tmp/xenc.npz``. Results:
benchmarks/results/selection-experiments.json.

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


class AnswerTopics:
    """Which *kind* of answer fits the question: the training answers are clustered (k-means over their char_wb
    1-3-gram TF-IDF vectors, ``k`` clusters) and a logistic regression learns p(cluster | question) from the
    pairs; a candidate, seen or new, is softly assigned to the clusters by its cosine to their centroids, and the
    score is log p(its cluster | q) under that soft assignment. The label model's idea with learned, finer labels."""

    def __init__(self, k=200, temperature=0.05, c=4.0, seed=0):
        self.k, self.temperature, self.c, self.seed = k, temperature, c, seed

    def fit(self, questions, answers):
        from sklearn.cluster import MiniBatchKMeans
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        pool = sorted(set(answers))
        self.av = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=2).fit(pool)
        km = MiniBatchKMeans(n_clusters=self.k, random_state=self.seed, n_init=3, batch_size=2048).fit(self.av.transform(pool))
        cent = km.cluster_centers_
        self.centroids = cent / np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-9)
        cluster = dict(zip(pool, km.labels_, strict=True))
        self.qv = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=2).fit(questions)
        y = np.asarray([cluster[a] for a in answers])
        self.clf = LogisticRegression(C=self.c, max_iter=300).fit(self.qv.transform(questions), y)
        return self

    def scores(self, questions, candidates):
        distinct = sorted({c for cs in candidates for c in cs})
        cid = {c: i for i, c in enumerate(distinct)}
        sim = np.asarray(self.av.transform(distinct) @ self.centroids.T)  # rows are unit TF-IDF vectors
        sim = sim[:, self.clf.classes_]
        soft = np.exp((sim - sim.max(1, keepdims=True)) / self.temperature)
        soft /= soft.sum(1, keepdims=True)
        pq = self.clf.predict_proba(self.qv.transform(list(questions)))
        return np.concatenate([np.log(soft[[cid[c] for c in cs]] @ pq[i] + 1e-9) for i, cs in enumerate(candidates)])


class HubNorm:
    """Hubness / querybank normalisation (CSLS, Conneau et al. 2018; inverted softmax, Smith et al. 2017; QB-Norm,
    Bogolin et al. 2022) with a querybank of the index's TRAINING questions only. Generic answers are hubs: near to
    many questions, so a raw similarity overrates them. Per TF-IDF space (char, word; the ranker's own vectorizers,
    fitted on the same pairs), columns (``cols``: groups ``qa`` and ``nb``, comma-free, e.g. ``cols=qa``):

    - ``qa`` group: CSLS 2 cos(q, c) - r_q - r_c (r_c: mean cosine of c to its ``k`` nearest bank questions, r_q: of
      q to its ``k`` nearest pool answers); r_c itself; the z-score and percentile of cos(q, c) among cos(b, c) over
      the bank b; the log inverted softmax cos(q, c)/T - log sum_b exp(cos(b, c)/T);
    - ``nb`` group: the ranker's ``path``, ``exact`` and ``reverse`` scores of (q, c) minus their mean over bank
      questions b (each b scored leave-one-out: its own text removed from the index, as a held-out question), and
      path's z-score. ``path`` for b is max over the union of b's ``topk`` answers by QP and c's ``topk`` nearest pool
      answers (a close approximation of the max over the whole pool).
    """

    def __init__(self, cfg, k=10, temperature=0.05, topk=20, groups=("qa", "nb"), chunk=500):
        self.cfg, self.k, self.t, self.topk, self.groups, self.chunk = cfg, k, temperature, topk, groups, chunk

    def fit(self, questions, answers):
        from chatforge.baselines.retrieval.ranker import SPACES

        self.idx = FeatureIndex.fit(questions, answers, None, dataclasses.replace(self.cfg, ranker_pmi=False,
                                                                               ranker_pair_lr=False))
        self.spaces = SPACES
        qs = self.idx.questions
        first = {}
        self.text_id = np.asarray([first.setdefault(q, len(first)) for q in qs])
        self.bank_rows = np.unique(self.text_id, return_index=True)[1]  # one bank row per distinct question text
        return self

    def _bank_nb(self, space, s_cp, rtop):
        from chatforge.baselines.retrieval.ranker import _softmax_rows

        """Over bank questions b (leave-own-text-out): sums and squares of path(b, c) for each candidate row of
        s_cp, and the mean of QP(b, p) per pool answer p."""
        idx = self.idx
        qvec = idx.question_vecs[space]
        m, npool = s_cp.shape
        ps, ps2, qsum = np.zeros(m), np.zeros(m), np.zeros(npool)
        kmax, kmid = min(max(self.cfg.ranker_neighbours), len(idx.questions)), 20
        u, nbmax_sum = np.zeros(npool), np.zeros(m)  # nbx: mean answer weights of nb20, sum of nbmax per candidate
        rvals = np.take_along_axis(s_cp, rtop, 1)  # (m, R)
        kk = min(self.topk, npool)
        for s in range(0, len(self.bank_rows), self.chunk):
            b = self.bank_rows[s:s + self.chunk]
            sims = _dense_(qvec[b] @ qvec.T)
            sims[self.text_id[b][:, None] == self.text_id[None, :]] = 0.0
            qp = idx.per_answer_max(sims)  # (B, P)
            if "nbx" in self.groups:
                top_q = np.argpartition(-sims, kmax - 1, axis=1)[:, :kmax]
                ts = np.take_along_axis(sims, top_q, 1)
                o = np.argsort(-ts, axis=1, kind="stable")
                top_q, ts = np.take_along_axis(top_q, o, 1), np.take_along_axis(ts, o, 1)
                np.add.at(u, idx.answer_of[top_q[:, :kmid]], _softmax_rows(ts[:, :kmid], self.cfg.neighbour_temperature))
                nbmax_sum += (s_cp[:, idx.answer_of[top_q]] * ts[None]).max(-1).sum(1)
            qsum += qp.sum(0)
            top = np.argpartition(-qp, kk - 1, axis=1)[:, :kk]  # (B, K)
            tv = np.take_along_axis(qp, top, 1)
            a = (s_cp[:, top] * tv[None]).max(-1)  # (m, B)
            bb = (qp[:, rtop] * rvals[None]).max(-1).T  # (m, B)
            path = np.maximum(a, bb)
            ps += path.sum(1)
            ps2 += (path * path).sum(1)
        nb = len(self.bank_rows)
        mu = ps / nb
        self._nbx = (s_cp @ (u / nb), nbmax_sum / nb)  # bank means of nb20 and nbmax per candidate
        return mu, np.sqrt(np.maximum(ps2 / nb - mu * mu, 0.0)), qsum / nb

    def scores(self, questions, candidates):
        from scipy.special import logsumexp

        from chatforge.baselines.retrieval.ranker import _normalize

        idx = self.idx
        distinct = sorted({c for cs in candidates for c in cs})
        cid = {c: i for i, c in enumerate(distinct)}
        rows = [np.asarray([cid[c] for c in cs]) for cs in candidates]
        pidx = np.asarray([idx.pool_id.get(c, -1) for c in distinct])
        in_pool, safe = pidx >= 0, np.maximum(pidx, 0)
        out = []
        for space in self.spaces:
            vec = idx.features.vectorizers[space]
            qv, cv = _normalize(vec.transform(list(questions))), _normalize(vec.transform(distinct))
            bank = idx.question_vecs[space][self.bank_rows]
            s_qc = _dense_(qv @ cv.T)
            if "qa" in self.groups:
                s_cb = _dense_(cv @ bank.T)  # (m, Nb)
                k = min(self.k, s_cb.shape[1])
                r_c = -np.partition(-s_cb, k - 1, axis=1)[:, :k].mean(1)
                s_qp = _dense_(qv @ idx.pool_vecs[space].T)
                r_q = -np.partition(-s_qp, k - 1, axis=1)[:, :k].mean(1)
                mu, sd = s_cb.mean(1), np.maximum(s_cb.std(1), 0.01)  # floor: word vectors can be all-zero
                lse = logsumexp(s_cb / self.t, axis=1)
                srt = np.sort(s_cb, 1) + 4.0 * np.arange(len(distinct))[:, None]  # rows offset: one searchsorted
                flat = srt.ravel()
                nb = s_cb.shape[1]
            if "nb" in self.groups or "nbx" in self.groups:
                from chatforge.baselines.retrieval.ranker import _softmax_rows

                s_qq = _dense_(qv @ idx.question_vecs[space].T)
                qp = idx.per_answer_max(s_qq)  # (n, P)
                s_cp = _dense_(cv @ idx.pool_vecs[space].T)  # (m, P)
                rk = min(self.cfg.ranker_reverse, s_cp.shape[1])
                rtop = np.argpartition(-s_cp, rk - 1, axis=1)[:, :rk]
                rw = _softmax_rows(np.take_along_axis(s_cp, rtop, 1), self.cfg.neighbour_temperature)
                ptop = np.argpartition(-s_cp, min(self.topk, s_cp.shape[1]) - 1, axis=1)[:, :self.topk]
                pmu, psd, qpmean = self._bank_nb(space, s_cp, ptop)
                exact_mu = np.where(in_pool, qpmean[safe], 0.0)
                rev_mu = (qpmean[rtop] * rw).sum(1)
                if "nbx" in self.groups:
                    kmax = min(max(self.cfg.ranker_neighbours), len(idx.questions))
                    top_q = np.argpartition(-s_qq, kmax - 1, axis=1)[:, :kmax]
                    ts = np.take_along_axis(s_qq, top_q, 1)
                    o = np.argsort(-ts, axis=1, kind="stable")
                    top_q, ts = np.take_along_axis(top_q, o, 1), np.take_along_axis(ts, o, 1)
                    nb20_mu, nbmax_mu = self._nbx
            feats = []
            for i, r in enumerate(rows):
                f = []
                qa = s_qc[i, r]
                if "qa" in self.groups:
                    pct = (np.searchsorted(flat, qa + 4.0 * r, side="left") + np.searchsorted(flat, qa + 4.0 * r, side="right")
                           - 2 * r * nb) / (2.0 * nb)  # mid-rank: ties (zeros) count half
                    f += [2 * qa - r_q[i] - r_c[r], r_c[r], (qa - mu[r]) / sd[r], pct, qa / self.t - lse[r]]
                if "nb" in self.groups:
                    cp = s_cp[r]
                    path = (qp[i][None, :] * cp).max(1)
                    exact = np.where(in_pool[r], qp[i][safe[r]], 0.0)
                    rev = (qp[i][rtop[r]] * rw[r]).sum(1)
                    f += [path - pmu[r], (path - pmu[r]) / np.maximum(psd[r], 0.01), exact - exact_mu[r], rev - rev_mu[r]]
                if "nbx" in self.groups:
                    cp = s_cp[r]
                    nb20 = cp[:, idx.answer_of[top_q[i, :20]]] @ _softmax_rows(ts[i, :20], self.cfg.neighbour_temperature)
                    nbmax = (cp[:, idx.answer_of[top_q[i]]] * ts[i]).max(1)
                    f += [nb20 - nb20_mu[r], nbmax - nbmax_mu[r]]
                feats.append(np.stack(f, 1))
            out.append(np.concatenate(feats))
        return np.concatenate(out, 1)


def _dense_(x):
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


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


# -- discriminative cross-encoder ---------------------------------------------------------------------------


def _answer_key(text):
    """Answers equal up to spaces and punctuation count as the same answer (no negative of each other)."""
    return "".join(ch for ch in text if ch.isalnum())


class _CrossEncoderNet(torch.nn.Module):
    """[CLS] question [SEP] candidate [SEP] -> one score: token + sinusoidal position + segment embeddings, a pre-LN
    Transformer encoder (``chatforge.modules``), then a tanh layer to a scalar over the [CLS] state (``cls``, BERT's
    pooler) or over [CLS; mean question state; mean candidate state; their product; |their difference|] (``match``).
    From scratch, the [CLS] read-out stayed at chance on 2,000 training pairs for 4 epochs (train R@1 of 8 0.14,
    also with mean pooling: 0.17), where ``match`` reached 0.51: the product gives the
    question-candidate interaction a direct path instead of leaving it to the feed-forward layers to discover."""

    def __init__(self, vocab, pad, d=128, heads=4, layers=2, ff=512, dropout=0.1, max_len=48, readout="cls"):
        from chatforge.modules.embeddings import SinusoidalPositionalEmbedding, TokenEmbedding
        from chatforge.modules.transformer_layers import TransformerEncoder

        super().__init__()
        self.pad = pad
        self.embed = TokenEmbedding(vocab, d, padding_idx=pad)
        self.positions = SinusoidalPositionalEmbedding(max_len, d)
        self.segments = torch.nn.Embedding(2, d)
        torch.nn.init.normal_(self.segments.weight, std=0.02)
        self.dropout = torch.nn.Dropout(dropout)
        self.encoder = TransformerEncoder(layers, d, heads, ff, dropout, "gelu", True)
        self.readout = readout
        self.pool = torch.nn.Linear(d * (5 if readout == "match" else 1), d)
        self.out = torch.nn.Linear(d, 1)

    def forward(self, ids, seg):
        from chatforge.modules.attention import padding_mask

        x = self.embed(ids) + self.positions(ids.size(1)) + self.segments(seg)
        h = self.encoder(self.dropout(x), padding_mask(ids, self.pad))
        z = h[:, 0]
        if self.readout == "match":  # [CLS; mean q; mean c; product; |difference|] (ESIM-style matching read-out)
            real = (ids != self.pad).unsqueeze(-1).float()
            in_c = seg.unsqueeze(-1).float() * real
            in_q = real - in_c
            mq = (h * in_q).sum(1) / in_q.sum(1).clamp(min=1.0)
            mc = (h * in_c).sum(1) / in_c.sum(1).clamp(min=1.0)
            z = torch.cat([z, mq, mc, mq * mc, (mq - mc).abs()], -1)
        return self.out(torch.tanh(self.pool(z))).squeeze(-1)


class CrossEncoder:
    """A discriminative cross-encoder trained from scratch with a listwise softmax loss: per training pair, the
    true answer against ``hard`` negatives drawn (fresh each epoch) from the answers of the ``neighbours`` nearest
    other training questions (char_wb 1-3-gram TF-IDF cosine, the ranker's char space; the first ``pool_hard``
    distinct ones) and ``rand`` answers drawn at random from the pool; answers equal to one of the question's own
    answers (up to spaces and punctuation) are never negatives. Tokens: the run's own SentencePiece model
    (``chatforge.tokenizer.Tokenizer``, trained on the training questions and answers)."""

    def __init__(self, epochs=4, hard=5, rand=2, batch=32, lr=1e-3, vocab=4000, d=128, layers=2, heads=4, ff=512,
                 max_len=48, max_q=20, neighbours=30, pool_hard=20, readout="match", seed=0):
        self.epochs, self.hard, self.rand, self.batch, self.lr = epochs, hard, rand, batch, lr
        self.vocab, self.d, self.layers, self.heads, self.ff = vocab, d, layers, heads, ff
        self.max_len, self.max_q, self.neighbours, self.pool_hard, self.seed = max_len, max_q, neighbours, pool_hard, seed
        self.readout = readout
        self.epoch_seconds: list[float] = []

    def settings(self):
        return {k: getattr(self, k) for k in ("epochs", "hard", "rand", "batch", "lr", "vocab", "d", "layers", "heads",
                                              "ff", "max_len", "max_q", "neighbours", "pool_hard", "readout", "seed")}

    def _pair(self, q, c):
        """Token ids and segment ids of [CLS] q [SEP] c [SEP], at most ``max_len`` tokens."""
        cls_, sep = self.tok.special.cls, self.tok.special.sep
        q = q[: self.max_q]
        c = c[: self.max_len - len(q) - 3]
        return [cls_, *q, sep, *c, sep], len(q) + 2

    def _batch(self, qids, cids):
        seqs = [self._pair(q, c) for q, c in zip(qids, cids, strict=True)]
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_id, dtype=torch.long)
        seg = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, nq) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            seg[i, nq : len(s)] = 1
        return ids, seg

    def _ids(self, texts):
        return [ids or [self.tok.unk_id] for ids in self.tok.encode_batch(list(texts))]

    def _forward(self, qids, cids, parts=4):
        """Scores in input order; the sequences sorted by length and run in ``parts`` sub-batches, each padded to
        its own longest (a quarter of the padding of one batch padded to the longest candidate drawn)."""
        order = np.argsort([min(len(q), self.max_q) + len(c) for q, c in zip(qids, cids, strict=True)], kind="stable")
        out = torch.empty(len(qids))
        for idx in np.array_split(order, parts):
            if len(idx):
                out = out.index_put((torch.as_tensor(idx),),
                                    self.net(*self._batch([qids[i] for i in idx], [cids[i] for i in idx])))
        return out

    def _mine(self, qs, own):
        """Per distinct question: up to ``pool_hard`` answer ids of its nearest other questions, nearest first."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=1)
        m = vec.fit_transform(qs)  # rows are L2-normalised
        k = min(self.neighbours, len(qs) - 1)
        hard = []
        for start in range(0, len(qs), 1024):
            s = (m[start : start + 1024] @ m.T).toarray()
            s[np.arange(s.shape[0]), np.arange(start, start + s.shape[0])] = -1.0  # not itself
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable"), 1)
            for r, row in enumerate(top):
                i, seen, out = start + r, set(), []
                for j in row:
                    for a in own[j]:
                        key = self.akey[a]
                        if key not in seen and key not in self.own_keys[i]:
                            seen.add(key)
                            out.append(a)
                out = out[: self.pool_hard]
                hard.append(np.asarray(out, dtype=np.int64))
        return hard

    def fit(self, questions, answers):
        from chatforge.tokenizer import Tokenizer

        t0 = time.perf_counter()
        pairs = list(dict.fromkeys(zip(questions, answers, strict=True)))
        pool = sorted({a for _, a in pairs})
        aid = {a: i for i, a in enumerate(pool)}
        dq = sorted({q for q, _ in pairs})
        qid = {q: i for i, q in enumerate(dq)}
        own = [[] for _ in dq]
        for q, a in pairs:
            own[qid[q]].append(aid[a])
        self.akey = [_answer_key(a) for a in pool]
        self.own_keys = [{self.akey[a] for a in o} for o in own]
        hard = self._mine(dq, own)
        self.tok = Tokenizer.train(dq + pool, vocab_size=self.vocab, on_vocab_too_large="lower")
        q_ids, a_ids = self._ids(dq), self._ids(pool)
        pq = np.asarray([qid[q] for q, _ in pairs])
        pa = np.asarray([aid[a] for _, a in pairs])
        self.mining_seconds = round(time.perf_counter() - t0, 1)
        log.info("xenc: %d pairs, %d questions, %d answers, mean hard list %.1f, vocab %d, prep %.1f s", len(pairs),
                 len(dq), len(pool), np.mean([len(h) for h in hard]), self.tok.vocab_size, self.mining_seconds)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.net = _CrossEncoderNet(self.tok.vocab_size, self.tok.pad_id, self.d, self.heads, self.layers, self.ff,
                                    max_len=self.max_len, readout=self.readout)
        n, k = len(pairs), self.hard + self.rand
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, self.lr, total_steps=self.epochs * -(-n // self.batch),
                                                    pct_start=0.1)
        target = torch.zeros(self.batch, dtype=torch.long)
        for epoch in range(self.epochs):
            t1 = time.perf_counter()
            self.net.train()
            perm = rng.permutation(n)
            total = correct = 0.0
            for start in range(0, n, self.batch):
                b = perm[start : start + self.batch]
                qs_, cs_ = [], []
                for i in b:
                    h = hard[pq[i]]
                    negs = list(rng.choice(h, size=min(self.hard, len(h)), replace=False)) if len(h) else []
                    keys = self.own_keys[pq[i]] | {self.akey[j] for j in negs}
                    while len(negs) < k:  # the random ones (and any the hard list could not give)
                        j = int(rng.integers(len(pool)))
                        if self.akey[j] not in keys:
                            keys.add(self.akey[j])
                            negs.append(j)
                    for j in [pa[i], *negs]:
                        qs_.append(q_ids[pq[i]])
                        cs_.append(a_ids[j])
                logits = self._forward(qs_, cs_).view(len(b), k + 1)
                loss = F.cross_entropy(logits, target[: len(b)])
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
                opt.step()
                sched.step()
                total += loss.item() * len(b)
                correct += (logits.argmax(1) == 0).sum().item()
            self.epoch_seconds.append(round(time.perf_counter() - t1, 1))
            log.info("xenc epoch %d: loss %.3f, train R@1 of %d %.3f, %.0f s", epoch + 1, total / n, k + 1,
                     correct / n, self.epoch_seconds[-1])
        self.net.eval()
        self.train_seconds = round(time.perf_counter() - t0, 1)
        return self

    @torch.inference_mode()
    def scores(self, questions, candidates, bs=1024):
        """One score per (question, candidate), lists concatenated in order."""
        dq = sorted(set(questions))
        dc = sorted({c for cs in candidates for c in cs})
        qi, ci = dict(zip(dq, self._ids(dq), strict=True)), dict(zip(dc, self._ids(dc), strict=True))
        fq = [qi[q] for q, cs in zip(questions, candidates, strict=True) for _ in cs]
        fc = [ci[c] for cs in candidates for c in cs]
        out = np.zeros(len(fq))
        order = np.argsort([min(len(a), self.max_q) + len(b) for a, b in zip(fq, fc, strict=True)], kind="stable")
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            out[idx] = self.net(*self._batch([fq[i] for i in idx], [fc[i] for i in idx])).double().numpy()
        return out


# ---------------------------------------------------------------------------------------------------------


def r1(scores, lists):
    ranks = [true_rank(s) for s in np.split(scores, np.cumsum([len(x) for x in lists])[:-1])]
    return np.asarray(ranks)


def fit_signal(kind, opts, tq, ta, tl, ix, cfg=None):
    """One extra signal, trained on the training pairs ``ix`` (``cfg``: the ranker's config, for ``hub``)."""
    q, a = _pick(tq, ix), _pick(ta, ix)
    if kind == "hub":
        return HubNorm(cfg, k=int(opts.get("k", 10)), temperature=float(opts.get("t", 0.05)),
                       topk=int(opts.get("topk", 20)), groups=tuple(opts.get("cols", "qa.nb").split("."))).fit(q, a)
    if kind in ("label", "labelvec"):
        return LabelAgreement(kind == "labelvec").fit(q, a, _pick(tl, ix))
    if kind == "bilinear":
        return Bilinear(dim=int(opts.get("dim", 128)), epochs=int(opts.get("epochs", 10)),
                        temperature=float(opts.get("t", 0.05)), ngram=(1, int(opts.get("n", 3)))).fit(q, a)
    if kind == "pairlr":
        return PairLogistic(negatives=int(opts.get("neg", 5)), alpha=float(opts.get("alpha", 1e-6)),
                            ngram=(int(opts.get("lo", 2)), int(opts.get("n", 2))),
                            epochs=int(opts.get("epochs", 5))).fit(q, a)
    if kind == "topics":
        return AnswerTopics(k=int(opts.get("k", 200)), temperature=float(opts.get("t", 0.05)),
                            c=float(opts.get("c", 4.0))).fit(q, a)
    if kind == "s2s":
        return Seq2SeqLikelihood(epochs=int(opts.get("epochs", 6))).fit(q, a)
    if kind == "xencfeat":  # the cross-encoder's score as a cross-fitted ranker column
        return CrossEncoder(**xenc_kwargs(opts)).fit(q, a)
    raise ValueError(f"unknown signal {kind!r}")


def xenc_kwargs(opts):
    """``xenc:epochs=3;hard=5`` -> CrossEncoder keyword arguments, cast like the defaults."""
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(CrossEncoder).parameters.items()}
    unknown = set(opts) - set(defaults) - {"split_seed", "cache"}
    if unknown:
        raise ValueError(f"unknown cross-encoder settings {sorted(unknown)}; allowed: {sorted(defaults)}")
    return {k: type(defaults[k])(v) for k, v in opts.items() if k in defaults}


def _split_scores(scores, lists):
    return np.split(scores, np.cumsum([len(x) for x in lists])[:-1])


def rank_metrics(ranks, novel, subset):
    """R@1 and MRR over the questions ``subset`` (bool), also split into new answers and training answers."""
    out = {}
    for name, m in (("", subset), ("_novel", subset & novel), ("_in_pool", subset & ~novel)):
        r = ranks[m]
        out[f"r1{name}"] = round(float((r == 0).mean()), 4)
        out[f"mrr{name}"] = round(float((1.0 / (r + 1)).mean()), 4)
        out[f"n{name}"] = int(m.sum())
    return out


def rerank_experiment(opts, margins, evals, tq, ta):
    """Variant ``xenc``: final score = ranker margin + w * cross-encoder score, the cross-encoder trained once on
    the whole training split; w chosen on one seeded half of the validation questions (R@1 of 10, then MRR of 10),
    reported on the other half and on all of validation, beside the ranker alone on the same questions. Also the
    swap (w chosen on the second half, reported on the first) and the out-of-sample figure over all questions that
    joins the two held-out halves."""
    import os

    cache = opts.get("cache")
    keys = [key for key in evals if key[0] == "valid"]
    if cache and os.path.exists(cache):
        z = np.load(cache, allow_pickle=False)
        xs = {key: z[f"{key[0]}_{key[1]}"] for key in keys}
        info = json.loads(str(z["info"]))
        log.info("xenc: scores read from %s", cache)
    else:
        model = CrossEncoder(**xenc_kwargs(opts)).fit(tq, ta)
        t0 = time.perf_counter()
        xs = {key: model.scores(evals[key]["q"], evals[key]["lists"]) for key in keys}
        info = {"settings": model.settings(), "prep_seconds": model.mining_seconds,
                "epoch_seconds": model.epoch_seconds, "train_seconds": model.train_seconds,
                "scoring_seconds_valid_10_and_100": round(time.perf_counter() - t0, 1),
                "parameters": sum(p.numel() for p in model.net.parameters()), "vocab": model.tok.vocab_size,
                "tokenizer": "the run's own SentencePiece unigram model (chatforge.tokenizer.Tokenizer) trained on "
                             "the training questions and answers"}
        if cache:
            np.savez(cache, info=json.dumps(info), **{f"{k[0]}_{k[1]}": v for k, v in xs.items()})
    n = len(evals[("valid", 10)]["q"])
    novel = evals[("valid", 10)]["novel"]
    rng = np.random.default_rng(int(opts.get("split_seed", 0)))
    half_a = np.zeros(n, dtype=bool)
    half_a[rng.permutation(n)[: n // 2]] = True
    everyone = np.ones(n, dtype=bool)

    def ranks(key, w):
        return r1(margins[key] + w * xs[key], evals[key]["lists"])

    grid = [0.0, *np.round(np.geomspace(0.001, 10.0, 41), 5).tolist()]

    def choose(subset):
        best = max(grid, key=lambda w: (lambda r: ((r == 0).mean(), (1.0 / (r + 1)).mean(), -w))(
            ranks(("valid", 10), w)[subset]))
        return float(best)

    def table(w, subset):
        out = {}
        for k in (10, 100):
            out[f"ranker_of_{k}"] = rank_metrics(ranks(("valid", k), 0.0), novel, subset)
            out[f"ranker_plus_xenc_of_{k}"] = rank_metrics(ranks(("valid", k), w), novel, subset)
        return out

    w_a, w_b = choose(half_a), choose(~half_a)
    oos = {}
    for k in (10, 100):
        ra, rb = ranks(("valid", k), w_a), ranks(("valid", k), w_b)
        joined = np.where(half_a, rb, ra)  # each half scored with the w chosen on the other
        oos[f"ranker_of_{k}"] = rank_metrics(ranks(("valid", k), 0.0), novel, everyone)
        oos[f"ranker_plus_xenc_of_{k}"] = rank_metrics(joined, novel, everyone)
    alone = {f"of_{k}": rank_metrics(r1(xs[("valid", k)], evals[("valid", k)]["lists"]), novel, everyone)
             for k in (10, 100)}
    res = {**info, "split_seed": int(opts.get("split_seed", 0)), "half_sizes": [int(half_a.sum()), int((~half_a).sum())],
           "w_grid": "0 and 41 values geometric from 0.001 to 10 (raw cross-encoder logit times w, added to the "
                     "XGBoost margin)",
           "cross_encoder_alone_valid": alone,
           "w_chosen_on_half_a": w_a,
           "half_a_tuning_in_sample": table(w_a, half_a),
           "half_b_held_out": table(w_a, ~half_a),
           "all_valid_with_w_from_half_a": table(w_a, everyone),
           "swap_w_chosen_on_half_b": w_b,
           "half_a_held_out_with_w_from_half_b": table(w_b, half_a),
           "all_valid_out_of_sample_each_half_with_the_other_halfs_w": oos}
    log.info("xenc alone %s; w from half A %.4g: half B %s", alone, w_a, res["half_b_held_out"])
    return res


def cached_whole_scores(kind, opts, evals):
    """``xencfeat:...;cache=FILE``: the whole-training-split model's validation scores saved by an ``xenc`` run with
    the same settings (the same model: it is trained once), or None."""
    import os

    if kind != "xencfeat" or not os.path.exists(opts.get("cache", "")):
        return None
    z = np.load(opts["cache"], allow_pickle=False)
    saved = json.loads(str(z["info"]))["settings"]
    want = CrossEncoder(**xenc_kwargs(opts)).settings()
    if saved != want:
        raise ValueError(f"{opts['cache']} holds scores of {saved}, not of {want}")
    missing = [key for key in evals if f"{key[0]}_{key[1]}" not in z.files]
    if missing:
        raise ValueError(f"{opts['cache']} lacks scores for {missing}")
    log.info("xencfeat: whole-split model's scores read from %s", opts["cache"])
    return {key: z[f"{key[0]}_{key[1]}"] for key in evals}


def fit_ranker(cfg, folds, extra=None):
    """The shipped ranker on the cross-fitted training lists, with ``extra`` columns when given."""
    x = np.concatenate([f["x"] for f in folds])
    if extra is not None:
        x = np.concatenate([x, extra], axis=1)
    groups = np.asarray([len(lst) for f in folds for lst in f["lists"]])
    y = np.concatenate([np.r_[1.0, np.zeros(g - 1)] for g in groups])
    return PairRanker(cfg.ranker, cfg.ranker_trees, cfg.ranker_depth, cfg.ranker_lr, cfg.seed, 2).fit(x, y, groups)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/retrieval_chatbot_kr_ranker.yaml")
    ap.add_argument("--out", default=None)
    ap.add_argument("--variants", default="base,bilinear")
    ap.add_argument("--oof", action="store_true",
                    help="also rank each fold's training lists by a ranker fitted on the other folds' lists")
    ap.add_argument("--test", action="store_true", help="also report test (only for the final choice)")
    ap.add_argument("--save-ranks", action="store_true",
                    help="keep per-question ranks (out of fold and validation) in the results, for paired tests")
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
    margins = None
    for variant in args.variants.split(","):
        t1 = time.perf_counter()
        kind, _, arg = variant.partition(":")
        if kind == "xenc":  # re-ranker on top of the shipped ranker (validation only)
            if margins is None:
                base = fit_ranker(cfg, folds)
                margins = {key: base.predict(e["x"]) for key, e in evals.items() if key[0] == "valid"}
            res = rerank_experiment(dict(kv.split("=") for kv in arg.split(";") if kv), margins, evals, tq, ta)
            results[variant] = {"seconds": round(time.perf_counter() - t1, 1), **res}
            continue
        extra_train, extra_eval, fold_seconds = [], {}, []
        if variant != "base":
            cols_train, cols_eval = [], {key: [] for key in evals}
            for part in variant.split("+"):  # several signals: one column each
                kind, _, arg = part.partition(":")
                opts = dict(kv.split("=") for kv in arg.split(";") if kv)
                cols = []
                for f in folds:
                    sig = fit_signal(kind, opts, tq, ta, tl, f["inside"], cfg)
                    cols.append(sig.scores(f["hq"], f["lists"]))
                    if hasattr(sig, "train_seconds"):
                        fold_seconds.append(sig.train_seconds)
                cols_train.append(np.concatenate(cols))
                whole = cached_whole_scores(kind, opts, evals)
                if whole is None:
                    m = fit_signal(kind, opts, tq, ta, tl, np.arange(len(tq)), cfg)
                    whole = {key: m.scores(e["q"], e["lists"]) for key, e in evals.items()}
                for key in evals:
                    cols_eval[key].append(whole[key])
            extra_train = [np.column_stack(cols_train)]
            extra_eval = {key: np.column_stack(c) for key, c in cols_eval.items()}
        ranker = fit_ranker(cfg, folds, np.concatenate(extra_train) if extra_train else None)
        res = {"seconds": round(time.perf_counter() - t1, 1)}
        if args.oof:  # R@1 of 20 on the training lists, each fold ranked by a ranker fitted on the others' lists
            all_extra = np.concatenate(extra_train) if extra_train else None
            sizes = np.cumsum([0] + [len(f["x"]) for f in folds])
            ranks = []
            for fi, f in enumerate(folds):
                rest = [g for gi, g in enumerate(folds) if gi != fi]
                ex = None if all_extra is None else np.concatenate(
                    [all_extra[sizes[gi]:sizes[gi + 1]] for gi in range(len(folds)) if gi != fi])
                rk = fit_ranker(cfg, rest, ex)
                xf = f["x"] if all_extra is None else np.concatenate([f["x"], all_extra[sizes[fi]:sizes[fi + 1]]], axis=1)
                ranks.append(r1(rk.predict(xf), f["lists"]))
            ranks = np.concatenate(ranks)
            res["train_oof_r1_of_20"] = round(float((ranks == 0).mean()), 4)
            res["train_oof_mrr_of_20"] = round(float((1.0 / (ranks + 1)).mean()), 4)
            if args.save_ranks:
                res["ranks_train_oof_of_20"] = ranks.astype(int).tolist()
        if fold_seconds:
            res["fold_train_seconds"] = fold_seconds
        for (name, k), e in evals.items():
            xe = np.concatenate([e["x"], extra_eval[(name, k)]], axis=1) if extra_eval else e["x"]
            ranks = r1(ranker.predict(xe), e["lists"])
            res[f"{name}_r1_of_{k}"] = float((ranks == 0).mean())
            res[f"{name}_mrr_of_{k}"] = round(float((1.0 / (ranks + 1)).mean()), 4)
            res[f"{name}_r1_of_{k}_novel"] = float((ranks[e["novel"]] == 0).mean())
            res[f"{name}_r1_of_{k}_in_pool"] = float((ranks[~e["novel"]] == 0).mean())
            if args.save_ranks:
                res[f"ranks_{name}_of_{k}"] = ranks.astype(int).tolist()
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
