"""A learned ranker over cheap (question, candidate) features for response selection (encoder ``ranker``).

Every feature is a similarity read off the training pairs (the "index"): TF-IDF cosines in a character
(char_wb n-grams) and a word space, and paths through the training data:

- ``qa``: cos(q, c);
- ``nb{k}``: sum_j w_j cos(a_j, c) over the answers a_j of the k training questions nearest to q,
  w = softmax(cos(q, q_j) / neighbour_temperature) (the TF-IDF scorer's neighbour term, several k);
- ``nbmax``: max_j cos(q, q_j) cos(a_j, c) over the same neighbours (largest k);
- ``exact``: max cos(q, q_j) over the training questions whose answer is exactly c (0 when c is in no
  training pair); ChatbotData repeats answers verbatim across paraphrased questions;
- ``path`` / ``path2``: max_p QP(q, p) cos(c, p)^e (e = 1, 2) over all pool answers p, QP(q, p) = max cos(q, q_j)
  over the questions of p: the soft version of ``exact`` (q -> a training question -> its answer ~ c);
- ``reverse``: sum_p v_p QP(q, p) over the ``ranker_reverse`` pool answers nearest to c,
  v = softmax(cos(c, p) / neighbour_temperature) (the neighbour term seen from the candidate's side);
- ``top1``: cos(q, nearest training question) (constant within a list: how reliable the others are);
- ``pmi_sum`` / ``pmi_mean`` (``ranker_pmi``): a learned question->answer association, sum over the
  (question char bigram, answer char bigram) pairs present of their positive pointwise mutual information in
  the training pairs, divided by sqrt(|q| |c|) / by |c|: it links "배고파" to "드세요" for an answer never seen;
- ``pair_lr`` (``ranker_pair_lr``): a logistic regression on hashed (question char n-gram, answer char
  n-gram) pairs, true pairs against random pool answers (:class:`PairLogistic`): the PMI idea, learned
  discriminatively; it ranks 10-answer lists alone at R@1 0.56 on ChatbotData's validation split;
- ``label_model_agree`` (``ranker_label_model``, with labels): p(label | q) . p(label | c) from two logistic
  regressions over the character TF-IDF space (:class:`LabelModel`), reading the candidate's own words;
- ``encoder`` (``ranker_encoder: biencoder | polyencoder``): the score of a Transformer bi- or poly-encoder
  (:class:`~chatforge.baselines.retrieval.model.ResponseSelector`, the bi-encoder keys of the config, no TF-IDF
  term) trained on the index's pairs, so per cross-fitting fold on the other folds only;
- global: c is a pool answer, log(1 + its count in training), its length, log length ratio c / q, and, when
  the training pairs carry labels (ChatbotData: 0 daily, 1 breakup, 2 love), the agreement of q's label
  (neighbour vote) with c's (its training pairs' labels, else its reverse neighbours' vote).

The ranker (XGBoost ``rank:pairwise`` or a pairwise logistic regression) is trained on candidate lists built
like the benchmark's (the true answer plus distinct answers of other held-out pairs) from the TRAIN split
with cross-fitting: each fold's features come from an index of the other folds, so a question never finds
itself (or a duplicate of itself: folds group identical question texts) among its neighbours, and its answer
counts as a pool answer only when other questions have it too, as for an unseen question.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from collections.abc import Sequence

import numpy as np

from chatforge.baselines.tfidf import TfidfFeatures

logger = logging.getLogger(__name__)

REVERSE_CHUNK = 256  # pool answers per product in FeatureIndex.reverse_neighbours (256 x 7,290 floats: 7 MB)
SPACES = ("char", "word")  # TfidfFeatures' two vectorizers, used as separate similarity spaces
LABEL_VOTERS = 20  # neighbours whose labels vote for the question's label


def dedupe_pairs(questions: Sequence[str], answers: Sequence[str], labels: Sequence[str] | None = None):
    """Pool answers (first-seen order), training questions (exact (q, a) duplicates once), answer index of each
    question and, when given, the labels of the kept pairs."""
    pool: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    qs, answer_of, labs = [], [], []
    for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
        if (q, a) in seen:
            continue
        seen.add((q, a))
        qs.append(q)
        answer_of.append(pool.setdefault(a, len(pool)))
        if labels is not None:
            labs.append(labels[i])
    return list(pool), qs, np.asarray(answer_of, dtype=np.int64), (labs if labels is not None else None)


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


def _normalize(x):
    from sklearn.preprocessing import normalize  # lazy: scikit-learn takes seconds to import

    return normalize(x)


def _softmax_rows(s: np.ndarray, temperature: float) -> np.ndarray:
    w = np.exp((s - s.max(axis=-1, keepdims=True)) / temperature)
    return w / w.sum(axis=-1, keepdims=True)


class PmiTable:
    """Positive PMI between question and answer character bigrams (char_wb, binary) over training pairs; pairs
    seen fewer than twice are dropped (their PMI is noise)."""

    MIN_COUNT = 2

    def __init__(self, question_vocab: dict[str, int], answer_vocab: dict[str, int], matrix) -> None:
        from sklearn.feature_extraction.text import CountVectorizer  # lazy: see _normalize

        kw = {"analyzer": "char_wb", "ngram_range": (2, 2), "binary": True, "dtype": np.float32}
        self.question_vec = CountVectorizer(vocabulary=question_vocab, **kw)
        self.answer_vec = CountVectorizer(vocabulary=answer_vocab, **kw)
        self.question_vocab, self.answer_vocab, self.matrix = question_vocab, answer_vocab, matrix

    @classmethod
    def fit(cls, questions: Sequence[str], answers: Sequence[str]) -> PmiTable:
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import CountVectorizer

        kw = {"analyzer": "char_wb", "ngram_range": (2, 2), "binary": True, "min_df": cls.MIN_COUNT,
              "dtype": np.float32}
        qv, av = CountVectorizer(**kw), CountVectorizer(**kw)
        bq, ba = qv.fit_transform(questions), av.fit_transform(answers)
        c = (bq.T @ ba).tocoo()
        dq, da = np.asarray(bq.sum(0)).ravel(), np.asarray(ba.sum(0)).ravel()
        pmi = np.log(c.data * len(questions) / (dq[c.row] * da[c.col]))
        keep = (pmi > 0) & (c.data >= cls.MIN_COUNT)
        m = sp.csr_matrix((pmi[keep].astype(np.float32), (c.row[keep], c.col[keep])), shape=c.shape)
        return cls({t: int(i) for t, i in qv.vocabulary_.items()}, {t: int(i) for t, i in av.vocabulary_.items()}, m)

    def scores(self, questions: Sequence[str], candidates: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, m) summed PMI, and the bigram counts (n,) of the questions and (m,) of the candidates."""
        bq, bc = self.question_vec.transform(questions), self.answer_vec.transform(candidates)
        return (_dense(bq @ self.matrix @ bc.T), np.asarray(bq.sum(1)).ravel(), np.asarray(bc.sum(1)).ravel())

    def to_arrays(self) -> dict[str, np.ndarray]:
        m = self.matrix
        return {"data": m.data, "indices": m.indices.astype(np.int64), "indptr": m.indptr.astype(np.int64),
                "shape": np.asarray(m.shape, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, question_vocab: dict[str, int], answer_vocab: dict[str, int],
                    arrays: dict[str, np.ndarray]) -> PmiTable:
        import scipy.sparse as sp

        m = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=tuple(arrays["shape"]))
        return cls(question_vocab, answer_vocab, m)


class PairLogistic:
    """A learned question->answer match score: a logistic regression on hashed (question char n-gram, answer char
    n-gram) pairs (char_wb, binary; n-grams seen in fewer than 2 texts dropped), trained on the training pairs
    against ``negatives`` random pool answers per pair. A pair's features are its n-gram pairs, each worth
    1 / sqrt(|q| |c| + 1) (so long texts do not win by size); the score is the margin. Unlike PMI, the weights
    are fitted jointly and negatively weighted pairs count, so "배고" -> "드세" is learned against the answers a
    hungry question does not get."""

    MIN_DF = 2

    def __init__(self, question_vocab: dict[str, int], answer_vocab: dict[str, int], ngram: tuple[int, int],
                 bits: int, weights: np.ndarray, intercept: float) -> None:
        from sklearn.feature_extraction.text import CountVectorizer  # lazy: see _normalize

        kw = {"analyzer": "char_wb", "ngram_range": tuple(ngram), "binary": True, "dtype": np.float32}
        self.question_vec = CountVectorizer(vocabulary=question_vocab, **kw)
        self.answer_vec = CountVectorizer(vocabulary=answer_vocab, **kw)
        self.question_vocab, self.answer_vocab, self.ngram, self.bits = question_vocab, answer_vocab, tuple(ngram), bits
        self.weights, self.intercept = np.asarray(weights, dtype=np.float32), float(intercept)

    @staticmethod
    def _hashes(q_ids: np.ndarray, a_ids: np.ndarray, n_answer_grams: int, bits: int) -> np.ndarray:
        return (q_ids[:, None].astype(np.int64) * n_answer_grams + a_ids[None, :]) % (1 << bits)

    @classmethod
    def fit(cls, questions: Sequence[str], answers: Sequence[str], ngram: tuple[int, int] = (2, 2), bits: int = 22,
            negatives: int = 5, epochs: int = 5, alpha: float = 1e-6, seed: int = 0) -> PairLogistic:
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.linear_model import SGDClassifier

        kw = {"analyzer": "char_wb", "ngram_range": tuple(ngram), "binary": True, "min_df": cls.MIN_DF,
              "dtype": np.float32}
        qv, av = CountVectorizer(**kw).fit(questions), CountVectorizer(**kw).fit(answers)
        bq, ba = qv.transform(questions).tocsr(), av.transform(answers).tocsr()
        pool = sorted(set(answers))
        pool_row = {a: i for i, a in enumerate(answers)}  # a row of ba holding each pool text
        rng = np.random.default_rng(seed)
        qi, ai = list(range(len(questions))), list(range(len(answers)))
        y = [1] * len(questions)
        for _ in range(negatives):
            for i, a in enumerate(answers):
                c = pool[int(rng.integers(len(pool)))]
                if c != a:
                    qi.append(i)
                    ai.append(pool_row[c])
                    y.append(0)
        va = len(av.vocabulary_)
        rows, cols, vals = [], [], []
        for r, (i, j) in enumerate(zip(qi, ai, strict=True)):
            g = bq.indices[bq.indptr[i] : bq.indptr[i + 1]]
            h = ba.indices[ba.indptr[j] : ba.indptr[j + 1]]
            hashed = cls._hashes(g, h, va, bits).ravel()
            rows.append(np.full(len(hashed), r))
            cols.append(hashed)
            vals.append(np.full(len(hashed), 1.0 / math.sqrt(len(g) * len(h) + 1.0), dtype=np.float32))
        x = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(len(y), 1 << bits))  # duplicates (hash collisions) are summed
        clf = SGDClassifier(loss="log_loss", alpha=alpha, max_iter=epochs, tol=None, random_state=seed)
        clf.fit(x, np.asarray(y))
        return cls({t: int(k) for t, k in qv.vocabulary_.items()}, {t: int(k) for t, k in av.vocabulary_.items()},
                   tuple(ngram), bits, clf.coef_[0], clf.intercept_[0])

    def scores(self, questions: Sequence[str], candidates: Sequence[str], rows: Sequence[np.ndarray]) -> np.ndarray:
        """The margin of each (question i, candidate j) for j in ``rows[i]`` (indices into ``candidates``),
        concatenated. Per question, u[h] = sum over its n-grams g of w[hash(g, h)] over every answer n-gram h,
        then each candidate's score is its n-gram indicator vector dotted with u: the same sum as the training
        features, without materialising the pairs."""
        bq = self.question_vec.transform(list(questions)).tocsr()
        bc = self.answer_vec.transform(list(candidates)).tocsr()
        nc = np.diff(bc.indptr)
        va = len(self.answer_vocab)
        every = np.arange(va, dtype=np.int64)
        out = []
        for i, r in enumerate(rows):
            g = bq.indices[bq.indptr[i] : bq.indptr[i + 1]]
            u = self.weights[self._hashes(g, every, va, self.bits)].sum(axis=0) if len(g) else np.zeros(va, np.float32)
            out.append((bc[r] @ u) / np.sqrt(len(g) * nc[r] + 1.0) + self.intercept)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        keep = np.flatnonzero(self.weights)  # buckets no training pair reached stay 0: store the others only
        return {"buckets": keep.astype(np.int64), "weights": self.weights[keep],
                "intercept": np.asarray([self.intercept], dtype=np.float32),
                "bits": np.asarray([self.bits], dtype=np.int64), "ngram": np.asarray(self.ngram, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, question_vocab: dict[str, int], answer_vocab: dict[str, int],
                    arrays: dict[str, np.ndarray]) -> PairLogistic:
        bits = int(arrays["bits"][0])
        w = np.zeros(1 << bits, dtype=np.float32)
        w[arrays["buckets"]] = arrays["weights"]
        return cls(question_vocab, answer_vocab, tuple(int(n) for n in arrays["ngram"]), bits, w,
                   float(arrays["intercept"][0]))


class LabelModel:
    """Two multinomial logistic regressions over the index's character TF-IDF space: the pair label (ChatbotData:
    0 daily, 1 breakup, 2 love) from the question text and from the answer text. ``agreement`` is
    p(label | q) . p(label | c): unlike the neighbour votes of ``label_agree`` it reads the candidate's own
    words, so it works for an answer no training pair has."""

    C = 4.0

    def __init__(self, question_coef: np.ndarray, question_bias: np.ndarray, answer_coef: np.ndarray,
                 answer_bias: np.ndarray) -> None:
        self.question_coef, self.question_bias = np.asarray(question_coef, np.float32), np.asarray(question_bias, np.float32)
        self.answer_coef, self.answer_bias = np.asarray(answer_coef, np.float32), np.asarray(answer_bias, np.float32)

    @classmethod
    def fit(cls, question_vecs, answer_vecs, question_labels: Sequence[str], answer_labels: Sequence[str],
            label_names: list[str]) -> LabelModel:
        from sklearn.linear_model import LogisticRegression

        parts = []
        for x, y in ((question_vecs, question_labels), (answer_vecs, answer_labels)):
            coef = np.zeros((len(label_names), x.shape[1]), dtype=np.float32)
            bias = np.full(len(label_names), -30.0, dtype=np.float32)  # a label absent here gets p ~ 0
            present = sorted(set(y))
            if len(present) == 1:
                bias[label_names.index(present[0])] = 0.0
            else:
                lr = LogisticRegression(C=cls.C, max_iter=1000).fit(x, list(y))
                rows = [label_names.index(c) for c in lr.classes_]
                if len(present) == 2:  # binary: one coefficient row for classes_[1] against classes_[0]
                    coef[rows[1]], bias[rows[1]], bias[rows[0]] = lr.coef_[0], lr.intercept_[0], 0.0
                else:
                    coef[rows], bias[rows] = lr.coef_, lr.intercept_
            parts += [coef, bias]
        return cls(*parts)

    @staticmethod
    def _proba(x, coef: np.ndarray, bias: np.ndarray) -> np.ndarray:
        z = _dense(x @ coef.T) + bias
        return _softmax_rows(z, 1.0)

    def agreement(self, question_vecs, candidate_vecs) -> np.ndarray:
        """(n, m): p(label | question i) . p(label | candidate j)."""
        return (self._proba(question_vecs, self.question_coef, self.question_bias)
                @ self._proba(candidate_vecs, self.answer_coef, self.answer_bias).T)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"question_coef": self.question_coef, "question_bias": self.question_bias,
                "answer_coef": self.answer_coef, "answer_bias": self.answer_bias}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LabelModel:
        return cls(arrays["question_coef"], arrays["question_bias"], arrays["answer_coef"], arrays["answer_bias"])


class FeatureIndex:
    """The training pairs as the features see them: pool, questions, TF-IDF vectors per space, answer counts
    and (optionally) label distributions. Built by :meth:`fit` or restored with :meth:`from_parts`."""

    def __init__(self, pool: list[str], questions: list[str], answer_of: np.ndarray, features: TfidfFeatures,
                 question_labels: list[str] | None, label_names: list[str] | None, pmi: PmiTable | None = None,
                 pair_lr: PairLogistic | None = None, label_model: LabelModel | None = None,
                 encoder=None) -> None:
        self.pool, self.questions, self.answer_of = pool, questions, np.asarray(answer_of, dtype=np.int64)
        self.features, self.pmi, self.pair_lr, self.label_model = features, pmi, pair_lr, label_model
        self.encoder = encoder  # ranker_encoder: a fitted bi-/poly-encoder ResponseSelector
        self.pool_id = {a: i for i, a in enumerate(pool)}
        self.count = np.bincount(self.answer_of, minlength=len(pool)).astype(np.float32)
        self.question_vecs = {s: _normalize(features.vectorizers[s].transform(questions)) for s in SPACES}
        self.pool_vecs = {s: _normalize(features.vectorizers[s].transform(pool)) for s in SPACES}
        # Transposed once, as CSR: `x @ vecs.T` hands scipy a CSC right side, which it converted to CSR on every
        # call (a tenth of a served select). The same conversion, so the products are the same numbers.
        self.question_vecs_t = {s: v.T.tocsr() for s, v in self.question_vecs.items()}
        self.pool_vecs_t = {s: v.T.tocsr() for s, v in self.pool_vecs.items()}
        self._reverse: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._reverse_lock = threading.Lock()
        # questions grouped by answer, for the per-answer max of question similarities (QP)
        self._order = np.argsort(self.answer_of, kind="stable")
        self._starts = np.r_[0, np.flatnonzero(np.diff(self.answer_of[self._order])) + 1]
        self.question_labels, self.label_names = question_labels, label_names
        self.question_label_dist = self.pool_label_dist = None
        if question_labels is not None:
            col = {name: j for j, name in enumerate(label_names)}
            q = np.zeros((len(questions), len(label_names)), dtype=np.float32)
            q[np.arange(len(questions)), [col[x] for x in question_labels]] = 1.0
            p = np.zeros((len(pool), len(label_names)), dtype=np.float32)
            np.add.at(p, self.answer_of, q)
            self.question_label_dist, self.pool_label_dist = q, p / p.sum(axis=1, keepdims=True)

    @classmethod
    def fit(cls, questions: Sequence[str], answers: Sequence[str], labels: Sequence[str] | None,
            tfidf_config, label_names: list[str] | None = None, make_encoder=None) -> FeatureIndex:
        """``make_encoder(config)`` -> an unfitted bi-/poly-encoder selector, for ``ranker_encoder`` (passed in by
        ``model.ResponseSelector``: this module is below ``model`` and does not import it)."""
        pool, qs, answer_of, labs = dedupe_pairs(questions, answers, labels)
        features = TfidfFeatures.from_config(tfidf_config)
        features.fit_transform(qs + pool)
        if labs is not None and label_names is None:
            label_names = sorted(set(labs))
        pair_answers = [pool[j] for j in answer_of]
        pmi = PmiTable.fit(qs, pair_answers) if getattr(tfidf_config, "ranker_pmi", False) else None
        pair_lr = None
        if getattr(tfidf_config, "ranker_pair_lr", False):
            c = tfidf_config
            pair_lr = PairLogistic.fit(qs, pair_answers, tuple(c.ranker_pair_lr_ngram), c.ranker_pair_lr_bits,
                                       c.ranker_pair_lr_negatives, c.ranker_pair_lr_epochs, seed=c.seed)
        encoder = None
        if getattr(tfidf_config, "ranker_encoder", "none") != "none":
            if make_encoder is None:
                raise ValueError("ranker_encoder needs make_encoder (the selector class that trains the encoder)")
            c = dataclasses.replace(tfidf_config, encoder=tfidf_config.ranker_encoder, tfidf_weight=0.0)
            encoder = make_encoder(c).fit(qs, pair_answers)  # no validation split: the last epoch's weights
        index = cls(pool, qs, answer_of, features, labs, label_names if labs is not None else None, pmi, pair_lr,
                    encoder=encoder)
        if labs is not None and getattr(tfidf_config, "ranker_label_model", False):
            answer_vecs = _normalize(features.vectorizers["char"].transform(pair_answers))
            index.label_model = LabelModel.fit(index.question_vecs["char"], answer_vecs, labs, labs, index.label_names)
        return index

    def reverse_neighbours(self, space: str, rk: int) -> tuple[np.ndarray, np.ndarray]:
        """For every pool answer, its ``rk`` nearest pool answers in ``space`` and their similarities, (P, rk) each:
        what :func:`pair_features` finds for a candidate that is a pool answer (the same rows, products and
        partition, so the same numbers), computed once per (space, rk) in chunks and kept. Serving's candidates are
        all pool answers: this spares each message a (candidates x pool) partition per space."""
        key = (space, rk)
        got = self._reverse.get(key)
        if got is None:
            with self._reverse_lock:
                got = self._reverse.get(key)
                if got is None:
                    tops, sims = [], []
                    for start in range(0, len(self.pool), REVERSE_CHUNK):
                        s = _dense(self.pool_vecs[space][start:start + REVERSE_CHUNK] @ self.pool_vecs_t[space])
                        top = np.argpartition(-s, rk - 1, axis=1)[:, :rk]
                        tops.append(top)
                        sims.append(np.take_along_axis(s, top, 1))
                    got = (np.concatenate(tops), np.concatenate(sims))
                    self._reverse[key] = got
        return got

    def per_answer_max(self, sims: np.ndarray) -> np.ndarray:
        """(n, P) from (n, N): for each pool answer, the max over its training questions."""
        return np.maximum.reduceat(sims[:, self._order], self._starts, axis=1)

    def feature_names(self, neighbours: Sequence[int]) -> list[str]:
        per = ["qa", *(f"nb{k}" for k in neighbours), "nbmax", "path", "path2", "exact", "reverse", "top1"]
        names = [f"{s}_{f}" for s in SPACES for f in per] + ["in_pool", "log_count", "length", "length_ratio"]
        if self.pmi is not None:
            names += ["pmi_sum", "pmi_mean"]
        if self.pair_lr is not None:
            names += ["pair_lr"]
        if self.encoder is not None:
            names += ["encoder"]
        if self.question_labels is not None:
            names += ["label_agree", "label_agree_reverse"]
        if self.label_model is not None:
            names += ["label_model_agree"]
        return names


def pair_features(index: FeatureIndex, questions: Sequence[str], candidates: Sequence[Sequence[str]],
                  neighbours: Sequence[int], reverse: int, temperature: float, reuse_pool: bool = False) -> np.ndarray:
    """One row per (question, candidate), lists concatenated in order; columns ``index.feature_names``.

    When every candidate is a pool answer (serving's shortlists) and ``reuse_pool``, their TF-IDF rows and reverse
    neighbours are the index's own (:meth:`FeatureIndex.reverse_neighbours`) instead of being computed again: the
    same numbers (tested), in about half the time of a served message."""
    n = len(questions)
    if n == 0:
        return np.zeros((0, len(index.feature_names(neighbours))), dtype=np.float32)
    distinct = sorted({c for cands in candidates for c in cands})
    cid = {c: i for i, c in enumerate(distinct)}
    rows = [np.asarray([cid[c] for c in cands], dtype=np.int64) for cands in candidates]
    pidx = np.asarray([index.pool_id.get(c, -1) for c in distinct], dtype=np.int64)
    in_pool = pidx >= 0
    safe = np.maximum(pidx, 0)
    from_pool = reuse_pool and bool(in_pool.all())
    kmax = min(max(neighbours), len(index.questions))
    rk = min(reverse, len(index.pool))
    cols: list[list[np.ndarray]] = []
    label_q = label_c = label_c_rev = None
    for space in SPACES:
        vec = index.features.vectorizers[space]
        qv = _normalize(vec.transform(list(questions)))
        cv = index.pool_vecs[space][pidx] if from_pool else _normalize(vec.transform(distinct))
        s_qq = _dense(qv @ index.question_vecs_t[space])  # (n, N)
        qp = index.per_answer_max(s_qq)  # (n, P)
        s_cp = _dense(cv @ index.pool_vecs_t[space])  # (m, P)
        s_qc = _dense(qv @ cv.T)  # (n, m)
        top = np.argpartition(-s_qq, kmax - 1, axis=1)[:, :kmax]
        ts = np.take_along_axis(s_qq, top, 1)
        order = np.argsort(-ts, axis=1, kind="stable")
        top, ts = np.take_along_axis(top, order, 1), np.take_along_axis(ts, order, 1)  # nearest first
        if from_pool:
            all_top, all_sims = index.reverse_neighbours(space, rk)
            rtop, rsims = all_top[pidx], all_sims[pidx]
        else:
            rtop = np.argpartition(-s_cp, rk - 1, axis=1)[:, :rk]  # (m, rk): pool answers nearest each candidate
            rsims = np.take_along_axis(s_cp, rtop, 1)
        rw = _softmax_rows(rsims, temperature)
        if space == SPACES[0] and index.question_labels is not None:
            lv = min(LABEL_VOTERS, kmax)
            label_q = np.einsum("nk,nkl->nl", _softmax_rows(ts[:, :lv], temperature),
                                index.question_label_dist[top[:, :lv]])
            label_c_rev = np.einsum("mk,mkl->ml", rw, index.pool_label_dist[rtop])
            label_c = np.where(in_pool[:, None], index.pool_label_dist[safe], label_c_rev)
        feats = []
        for i in range(n):
            r = rows[i]
            cp = s_cp[r]  # (len, P)
            f = [s_qc[i, r]]
            for k in neighbours:
                k = min(k, kmax)
                f.append(cp[:, index.answer_of[top[i, :k]]] @ _softmax_rows(ts[i, :k], temperature))
            f.append((cp[:, index.answer_of[top[i]]] * ts[i]).max(axis=1))
            f.append((qp[i][None, :] * cp).max(axis=1))
            f.append((qp[i][None, :] * cp * cp).max(axis=1))
            f.append(np.where(in_pool[r], qp[i][safe[r]], 0.0))
            f.append((qp[i][rtop[r]] * rw[r]).sum(axis=1))
            f.append(np.full(len(r), ts[i, 0]))
            feats.append(np.stack(f, axis=1))
        cols.append(np.concatenate(feats))
    lengths = np.asarray([len(c) for c in distinct], dtype=np.float32)
    if index.pmi is not None:
        pmi, nq, nc = index.pmi.scores(list(questions), distinct)
    if index.label_model is not None:
        char = index.features.vectorizers["char"]
        label_model = index.label_model.agreement(_normalize(char.transform(list(questions))),
                                                  _normalize(char.transform(distinct)))
    if index.pair_lr is not None:
        pair_lr = np.split(index.pair_lr.scores(list(questions), distinct, rows), np.cumsum([len(r) for r in rows])[:-1])
    if index.encoder is not None:
        encoder = index.encoder.score(list(questions), candidates)
    glob = []
    for i in range(n):
        r = rows[i]
        g = [in_pool[r].astype(np.float32), np.log1p(np.where(in_pool[r], index.count[safe[r]], 0.0)),
             lengths[r], np.log1p(lengths[r]) - math.log1p(len(questions[i]))]
        if index.pmi is not None:
            g += [pmi[i, r] / np.sqrt((nq[i] + 1.0) * (nc[r] + 1.0)), pmi[i, r] / (nc[r] + 1.0)]
        if index.pair_lr is not None:
            g.append(pair_lr[i])
        if index.encoder is not None:
            g.append(encoder[i])
        if label_q is not None:
            g += [label_c[r] @ label_q[i], label_c_rev[r] @ label_q[i]]
        if index.label_model is not None:
            g.append(label_model[i, r])
        glob.append(np.stack(g, axis=1))
    cols.append(np.concatenate(glob))
    return np.concatenate(cols, axis=1).astype(np.float32)


def draw_lists(answers: Sequence[str], size: int, rng: np.random.Generator) -> list[list[str]]:
    """Per pair: its answer plus up to ``size - 1`` distinct other answers of the same pairs (the benchmark's
    scheme: distractors are held-out answers, an identical text is no distractor)."""
    distinct = sorted(set(answers))
    where = {a: i for i, a in enumerate(distinct)}
    k = min(size - 1, len(distinct) - 1)
    out = []
    for a in answers:
        pos = rng.choice(len(distinct) - 1, size=k, replace=False)
        pos = pos + (pos >= where[a])
        out.append([a] + [distinct[int(j)] for j in pos])
    return out


def _pick(seq: Sequence, idx: np.ndarray) -> list:
    return [seq[i] for i in idx]


def cross_fit_features(questions: Sequence[str], answers: Sequence[str], labels: Sequence[str] | None, cfg,
                       make_encoder=None):
    """Training rows for the ranker: (X, y, group sizes, fold of each list). Folds group identical question
    texts; each fold's lists are scored against a :class:`FeatureIndex` of the other folds only."""
    rng = np.random.default_rng(cfg.seed)
    distinct_q = sorted(set(questions))
    fold_of = dict(zip(distinct_q, rng.permutation(len(distinct_q)) % cfg.ranker_folds, strict=True))
    fold = np.asarray([fold_of[q] for q in questions])
    xs, ys, groups, folds = [], [], [], []
    for f in range(cfg.ranker_folds):
        inside, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if len(held) == 0 or len({answers[i] for i in inside}) < 2 or len({answers[i] for i in held}) < 2:
            continue
        # label_names from all the labels: a fold can miss a rare one, and the columns must line up
        index = FeatureIndex.fit(_pick(questions, inside), _pick(answers, inside),
                                 _pick(labels, inside) if labels is not None else None, cfg,
                                 sorted(set(labels)) if labels is not None else None, make_encoder)
        pairs = list(dict.fromkeys(zip(_pick(questions, held), _pick(answers, held), strict=True)))
        hq, ha = [p[0] for p in pairs], [p[1] for p in pairs]
        lists = draw_lists(ha, cfg.ranker_negatives + 1, rng)
        xs.append(pair_features(index, hq, lists, cfg.ranker_neighbours, cfg.ranker_reverse,
                                cfg.neighbour_temperature))
        for lst in lists:
            ys.append(np.r_[1.0, np.zeros(len(lst) - 1)])
            groups.append(len(lst))
            folds.append(f)
        logger.info("ranker cross-fit fold %d: %d lists against %d indexed pairs", f, len(lists), len(inside))
    if not xs:
        raise ValueError("the ranker needs at least 2 distinct answers inside and outside every fold; "
                         "give more training pairs or fewer ranker_folds")
    return np.concatenate(xs), np.concatenate(ys), np.asarray(groups), np.asarray(folds)


class PairRanker:
    """Scores feature rows: XGBoost ``rank:pairwise`` or a logistic regression on pairwise differences
    (true minus each distractor, standardised). Saved as JSON, never pickled."""

    def __init__(self, kind: str, trees: int = 400, depth: int = 4, learning_rate: float = 0.05, seed: int = 0,
                 n_jobs: int = 1) -> None:
        self.kind, self.trees, self.depth, self.learning_rate = kind, trees, depth, learning_rate
        self.seed, self.n_jobs = seed, n_jobs
        self._booster = None
        self.coef: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> PairRanker:
        if self.kind == "xgboost":
            import xgboost  # lazy: xgboost takes seconds to import; families.py registers every family at startup

            model = xgboost.XGBRanker(objective="rank:pairwise", n_estimators=self.trees, max_depth=self.depth,
                                      learning_rate=self.learning_rate, subsample=0.8, colsample_bytree=0.8,
                                      random_state=self.seed, n_jobs=self.n_jobs, tree_method="hist")
            model.fit(x, y, group=groups)
            self._booster = model.get_booster()
        else:
            from sklearn.linear_model import LogisticRegression  # lazy: see TfidfFeatures

            starts = np.r_[0, np.cumsum(groups)]
            diffs = np.concatenate([x[s + 1 : e] - x[s] for s, e in zip(starts[:-1], starts[1:], strict=True)])
            self.scale = x.astype(np.float64).std(axis=0) + 1e-6
            d = diffs / self.scale
            lr = LogisticRegression(C=1.0, max_iter=2000, fit_intercept=False)
            lr.fit(np.r_[d, -d], np.r_[np.zeros(len(d)), np.ones(len(d))])
            self.coef = lr.coef_[0].astype(np.float64)  # class 1 = "true minus distractor": higher x @ coef = more likely the true one
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Ranking scores (higher is better), float64."""
        if self.kind == "xgboost":
            import xgboost

            return self._booster.predict(xgboost.DMatrix(x), output_margin=True).astype(np.float64)
        return (x.astype(np.float64) / self.scale) @ self.coef

    def to_json(self) -> dict:
        doc = {"kind": self.kind, "trees": self.trees, "depth": self.depth, "learning_rate": self.learning_rate,
               "seed": self.seed}
        if self.kind == "xgboost":
            doc["booster"] = json.loads(bytes(self._booster.save_raw("json")).decode("utf-8"))
        else:
            doc["coef"], doc["scale"] = self.coef.tolist(), self.scale.tolist()
        return doc

    @classmethod
    def from_json(cls, doc: dict, n_jobs: int = 1) -> PairRanker:
        self = cls(doc["kind"], doc["trees"], doc["depth"], doc["learning_rate"], doc["seed"], n_jobs)
        if self.kind == "xgboost":
            import xgboost

            booster = xgboost.Booster()
            booster.load_model(bytearray(json.dumps(doc["booster"]).encode("utf-8")))
            booster.set_param({"nthread": n_jobs})
            self._booster = booster
        else:
            self.coef, self.scale = np.asarray(doc["coef"]), np.asarray(doc["scale"])
        return self
