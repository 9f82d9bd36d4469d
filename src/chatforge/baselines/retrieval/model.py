"""Response selection: pick the reply from a pool of curated answers (retrieval-first chit-chat).

Three encoders share one scorer. ``tfidf``: word + char_wb TF-IDF (the baseline every learned matcher
must beat). ``biencoder``: a Transformer encoder (``chatforge.modules``) trained here from scratch with
in-batch negatives, one encoder shared by questions and answers (Humeau et al. 2020, "Poly-encoders",
section 4.1, bi-encoder; shared weights because both sides are the same language and the data is
small). ``polyencoder`` (ibid., section 4.4): the same network and training, but a question is m global
vectors (m learned codes, each attending over the question's token states) and each candidate's vector
attends over those m to form the question vector it is scored against. The scorer adds to the question-answer similarity a neighbour term: the candidate's
similarity to the answers of the training questions nearest to the question. ChatbotData repeats
answers across paraphrased questions, and this term is what turns that into signal.

The candidate pool (deduplicated training answers, each with its source questions) is part of the
saved model and encoded once when it is saved; the bi-encoder searches it exactly with a matrix product, or
through a FAISS index saved in the bundle (``search``; ``search.py``, where ``auto``'s threshold comes from).
Saved as JSON + safetensors, never pickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file
from torch import nn

from chatforge.baselines.retrieval.config import RetrievalConfig
from chatforge.baselines.retrieval.familiarity import CharBigramModel
from chatforge.baselines.retrieval.ranker import (
    SPACES,
    FeatureIndex,
    LabelModel,
    PairLogistic,
    PairRanker,
    PmiTable,
    cross_fit_features,
    dedupe_pairs,
    pair_features,
)
from chatforge.baselines.retrieval.search import SearchParams, VectorSearch, composite_queries, shortlist_topk
from chatforge.baselines.tfidf import TfidfFeatures, check_texts, read_saved_meta
from chatforge.fileio import atomic_write_bytes, atomic_write_json
from chatforge.modules.embeddings import LearnedPositionalEmbedding, TokenEmbedding
from chatforge.modules.transformer_layers import TransformerEncoderLayer
from chatforge.registry import BuildContext
from chatforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "retrieval_meta.json"
POOL_FILE = "retrieval_pool.json"
VECTORIZERS_FILE = "vectorizers.json"
ENCODER_FILE = "encoder.safetensors"
EMBEDDINGS_FILE = "pool_embeddings.safetensors"
TOKENIZER_FILE = "retrieval_tokenizer.model"
TFIDF_DIR = "tfidf"  # the TF-IDF scorer a bi-encoder adds (tfidf_weight > 0)
RANKER_FILE = "ranker.json"  # encoder ranker: the trained ranker (XGBoost booster JSON or logistic weights)
PMI_FILE = "pmi.safetensors"  # encoder ranker, ranker_pmi: the question->answer PMI matrix (CSR arrays)
PMI_VOCAB_FILE = "pmi_vocab.json"
PAIR_LR_FILE = "pair_lr.safetensors"  # encoder ranker, ranker_pair_lr: the hashed pair weights (non-zero only)
PAIR_LR_VOCAB_FILE = "pair_lr_vocab.json"
LABEL_MODEL_FILE = "label_model.safetensors"  # encoder ranker, ranker_label_model with labels: the two classifiers
RANKER_ENCODER_DIR = "ranker_encoder"  # encoder ranker, ranker_encoder: the saved bi-/poly-encoder selector
# bi-encoder searching through FAISS (search.py): the indexes of the pool and of the training questions
SEARCH_FILES = {"pool": "search_pool.faiss", "questions": "search_questions.faiss"}


class BiEncoder(nn.Module):
    """Token + learned position embeddings -> pre-LN Transformer encoder layers -> masked mean -> unit vector."""

    def __init__(self, vocab_size: int, pad_id: int, d_model: int, n_heads: int, num_layers: int, d_ff: int,
                 dropout: float, max_len: int):
        super().__init__()
        self.pad_id = pad_id
        self.embed = TokenEmbedding(vocab_size, d_model, padding_idx=pad_id)
        self.pos = LearnedPositionalEmbedding(max_len, d_model)
        self.layers = nn.ModuleList([TransformerEncoderLayer(d_model, n_heads, d_ff, dropout, norm_first=True)
                                     for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)

    def states(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The final token states (B, T, D) and the mask of real (non-padding) tokens (B, T)."""
        keep = ids != self.pad_id  # (B, T)
        h = self.embed(ids) + self.pos(ids.shape[1])  # (B, T, D)
        for layer in self.layers:
            h = layer(h, keep[:, None, None, :])  # padding mask (B, 1, 1, T)
        return self.norm(h), keep

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _mean_unit(*self.states(ids))

    def batch_sims(self, q_ids: torch.Tensor, a_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training similarities: question x answer (B, U) and question x question (B, B)."""
        q, a = self(q_ids), self(a_ids)
        return q @ a.T, q @ q.T


def _mean_unit(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    w = keep.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
    pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)  # (B, D)
    return F.normalize(pooled, dim=-1)


class PolyEncoder(BiEncoder):
    """Poly-encoder (Humeau et al. 2020, section 4.4) on the bi-encoder's network.

    Candidate side (``forward``): the bi-encoder's unit vector. Question side (``context``): m global vectors
    y_1..y_m, code i's softmax attention over the token states; a candidate c then attends over them,
    w = softmax_i(y_i . c), and the score is cos(sum_i w_i y_i, c) (:func:`poly_scores`), so the score of a
    candidate depends on the question and that candidate alone. With m = 1 the question is one
    attention-pooled vector and the score is the bi-encoder's cosine; with that code at zero the attention is
    uniform over the real tokens, i.e. the bi-encoder's mean pooling (``tests/baselines/test_retrieval_poly.py``).
    Weights are shared by both sides, as in the bi-encoder.
    """

    def __init__(self, *args, codes: int, **kwargs):
        super().__init__(*args, **kwargs)
        d_model = self.norm.normalized_shape[0]
        # Random, not zero: identical codes get identical gradients and would never become different.
        self.codes = nn.Parameter(torch.randn(codes, d_model) * d_model**-0.5)

    def context(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The question's m global vectors (B, m, D) and its candidate-side unit vector (B, D), from one pass."""
        h, keep = self.states(ids)
        logits = torch.einsum("md,btd->bmt", self.codes, h).masked_fill(~keep[:, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1) @ h, _mean_unit(h, keep)

    def batch_sims(self, q_ids: torch.Tensor, a_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # question x question scores the other questions as candidates of this question's m vectors
        ctx, q = self.context(q_ids)
        return poly_scores(ctx, self(a_ids)), poly_scores(ctx, q)


def poly_scores(ctx: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """(B, U) poly-encoder scores of questions ``ctx`` (B, m, D) against unit candidate vectors (U, D):
    cos(sum_i w_i y_i, c) with w = softmax_i(y_i . c). Without building the (B, U, D) attended vectors: the
    dot product is sum_i w_i (y_i . c) and the squared norm w^T (Y Y^T) w."""
    logits = torch.einsum("bmd,ud->bum", ctx, cands)  # (B, U, m)
    w = torch.softmax(logits, dim=-1)
    dot = (w * logits).sum(-1)
    norm2 = torch.einsum("bum,bmn,bun->bu", w, ctx @ ctx.transpose(1, 2), w)
    return dot / norm2.clamp_min(1e-12).sqrt()


def _dedupe_pairs(questions: Sequence[str], answers: Sequence[str]):
    """Pool answers (first-seen order), training questions (exact (q, a) duplicates once) and answer index."""
    pool, qs, answer_of, _ = dedupe_pairs(questions, answers)
    return pool, qs, answer_of


class ResponseSelector:
    """Scores candidate replies for a question and selects the best one from its pool.

    ``fit(questions, answers)`` / ``score(questions, candidates)`` / ``select(questions)`` /
    ``save`` / ``load``. Scores are ``qa_weight * cos(q, c) + sum_k w_k cos(a_k, c)`` (see
    :class:`RetrievalConfig`); with unit vectors each term is at most 1, so the score of the best pool
    answer is comparable across questions and a threshold on it decides when retrieval is sure enough.
    """

    labels: list[str] = []  # no classes: a selection bundle has no labels.json

    def __init__(self, config: RetrievalConfig | None = None) -> None:
        self.config = config if config is not None else RetrievalConfig()
        self.pool: list[str] = []
        self.questions: list[str] = []
        self.answer_of = np.zeros(0, dtype=np.int64)
        self.history: list[dict] = []
        self._features: TfidfFeatures | None = None
        self._tok: Tokenizer | None = None
        self._net: BiEncoder | None = None  # a PolyEncoder for encoder polyencoder
        self._pool_vecs = None  # (P, D): dense for the bi-encoder, CSR for TF-IDF
        self._question_vecs = None  # (N, D)
        self._tfidf: ResponseSelector | None = None  # tfidf_weight > 0: the TF-IDF scorer added to the bi-encoder's
        self._index: FeatureIndex | None = None  # encoder ranker: the training pairs its features read
        self._ranker: PairRanker | None = None
        self._search: dict[str, VectorSearch] | None = None  # bi-encoder: pool and question search, see _searches
        self._familiarity: CharBigramModel | None = None  # built from the training questions on first use
        self._familiarity_lock = threading.Lock()

    # -- encoding ---------------------------------------------------------------------------------------

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        cut = self.config.max_len
        return [(self._tok.encode(t)[:cut] or [self._tok.unk_id]) for t in texts]

    def _pad(self, rows: list[list[int]]) -> torch.Tensor:
        out = torch.full((len(rows), max(len(r) for r in rows)), self._tok.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out

    def encode(self, texts: Sequence[str], batch_size: int = 512):
        """Unit vectors of ``texts``: an (n, D) float32 array (bi-encoder) or an (n, V) CSR matrix (TF-IDF)."""
        texts = check_texts(texts, "texts")
        if self.config.encoder == "tfidf":
            from sklearn.preprocessing import normalize  # lazy: scikit-learn takes seconds to import

            return normalize(self._features.transform(texts)).astype(np.float32)
        if not texts:
            return np.zeros((0, self.config.d_model), dtype=np.float32)
        self._net.eval()
        ids = self._ids(texts)
        with torch.inference_mode():
            parts = [self._net(self._pad(ids[i : i + batch_size])) for i in range(0, len(ids), batch_size)]
        return torch.cat(parts).numpy()

    def _encode_questions(self, texts: Sequence[str]):
        """The question side: ``encode`` except for the poly-encoder, whose questions are (n, m, D) global vectors."""
        if self.config.encoder != "polyencoder":
            return self.encode(texts)
        self._net.eval()
        ids = self._ids(texts)
        with torch.inference_mode():
            parts = [self._net.context(self._pad(ids[i : i + 512]))[0] for i in range(0, len(ids), 512)]
        return torch.cat(parts).numpy()

    def _qa_sims(self, qv, cand_vecs) -> np.ndarray:
        """(n, m) question x candidate similarities, ``qv`` from ``_encode_questions``. The poly-encoder's is exact
        over any number of candidates: per question chunk one batched op of (chunk, m codes, candidates)."""
        if self.config.encoder != "polyencoder":
            return self._sims(qv, cand_vecs)
        cands = torch.from_numpy(np.ascontiguousarray(cand_vecs))
        with torch.inference_mode():  # chunks of 32 questions keep (32, 7k answers, m) in tens of MB
            parts = [poly_scores(torch.from_numpy(qv[i : i + 32]), cands) for i in range(0, len(qv), 32)]
        return torch.cat(parts).numpy() if parts else np.zeros((0, len(cand_vecs)), dtype=np.float32)

    @staticmethod
    def _sims(a, b) -> np.ndarray:
        """Dense (len(a), len(b)) dot products of unit vectors (dense or sparse)."""
        s = a @ b.T
        return np.asarray(s.toarray() if hasattr(s, "toarray") else s, dtype=np.float32)

    def _neighbour_weights(self, qv, approximate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Per question: indices (n, k) of the k nearest training questions and softmax weights (n, k).
        ``approximate``: through the questions' FAISS index when the bi-encoder's search uses one."""
        k = min(self.config.neighbours, len(self.questions))
        if approximate and self._searches()["questions"].uses_faiss:
            s, top = self._searches()["questions"].search(qv, k)  # a place the index left empty weighs 0
            s, top = s / self.config.neighbour_temperature, np.maximum(top, 0)
            w = np.exp(s - s.max(axis=1, keepdims=True))
            return top, w / w.sum(axis=1, keepdims=True)
        sims = self._qa_sims(qv, self._question_vecs)  # (n, N)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # (n, k), unordered: the weights do not care
        s = np.take_along_axis(sims, top, axis=1) / self.config.neighbour_temperature
        w = np.exp(s - s.max(axis=1, keepdims=True))
        return top, w / w.sum(axis=1, keepdims=True)

    def _score_vecs(self, qv, cand_vecs, row: int, top, weights) -> np.ndarray:
        cfg = self.config
        score = cfg.qa_weight * self._qa_sims(qv[row : row + 1], cand_vecs)[0]  # (m,)
        if top is not None:
            neighbour_answers = self._pool_vecs[self.answer_of[top[row]]]  # (k, D)
            score = score + self._sims(cand_vecs, neighbour_answers) @ weights[row]  # (m, k) @ (k,)
        return score

    # -- inference ---------------------------------------------------------------------------------------

    def _require_fitted(self) -> None:
        if self._pool_vecs is None and self._ranker is None:
            raise RuntimeError("ResponseSelector is not fitted; call fit() or load() first")

    def score(self, questions: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """For each question, the scores of its own candidate list (higher is better)."""
        self._require_fitted()
        questions = check_texts(questions, "questions")
        if len(questions) != len(candidates):
            raise ValueError(f"one candidate list per question: got {len(questions)} questions and "
                             f"{len(candidates)} candidate lists")
        if not questions:
            return []
        if self._ranker is not None:
            return self._ranker_scores(questions, [list(c) for c in candidates])
        qv = self._encode_questions(questions)
        top, weights = self._neighbour_weights(qv) if self.config.neighbours else (None, None)
        distinct = sorted({c for cands in candidates for c in cands})
        index = {c: i for i, c in enumerate(distinct)}
        cv = self.encode(distinct)
        out = [self._score_vecs(qv, cv[[index[c] for c in cands]], i, top, weights)
               for i, cands in enumerate(candidates)]
        if self._tfidf is not None:
            w = self.config.tfidf_weight
            out = [s + w * t for s, t in zip(out, self._tfidf.score(questions, candidates), strict=True)]
        return out

    def _ranker_scores(self, questions: list[str], candidates: list[list[str]],
                       from_pool: bool = False) -> list[np.ndarray]:
        """``from_pool``: the candidates are pool answers (select's shortlists), whose rows the index holds."""
        cfg = self.config
        x = pair_features(self._index, questions, candidates, cfg.ranker_neighbours, cfg.ranker_reverse,
                          cfg.neighbour_temperature, reuse_pool=from_pool)
        # The sigmoid of the ranker's margin: same order, and a score in (0, 1) that a serving threshold can use.
        s = 1.0 / (1.0 + np.exp(-self._ranker.predict(x)))
        return np.split(s, np.cumsum([len(c) for c in candidates])[:-1])

    def _shortlist(self, questions: list[str], size: int) -> list[list[str]]:
        """Per question, the pool answers worth re-ranking: in each similarity space, the ``size`` answers whose
        training questions are nearest (exact answer index) and the ``size`` nearest to the question itself."""
        from chatforge.baselines.retrieval.ranker import _dense, _normalize

        ix = self._index
        k = min(size, len(self.pool))
        picks = [[] for _ in questions]
        for space in SPACES:
            qv = _normalize(ix.features.vectorizers[space].transform(questions))
            for sims in (ix.per_answer_max(_dense(qv @ ix.question_vecs_t[space])),
                         _dense(qv @ ix.pool_vecs_t[space])):
                top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
                for i, row in enumerate(top):
                    picks[i].extend(int(j) for j in row)
        return [[self.pool[j] for j in dict.fromkeys(p)] for p in picks]

    def _pool_scores(self, questions: list[str]) -> np.ndarray:
        """(n, P) scores of every pool answer for each question."""
        qv = self._encode_questions(questions)
        top, weights = self._neighbour_weights(qv) if self.config.neighbours else (None, None)
        s = np.stack([self._score_vecs(qv, self._pool_vecs, i, top, weights) for i in range(len(questions))])
        if self._tfidf is not None:
            s += self.config.tfidf_weight * self._tfidf._pool_scores(questions)
        return s

    def select(self, questions: Sequence[str], top_k: int = 1) -> list[list[tuple[str, float]]]:
        """The ``top_k`` pool answers for each question, best first, with their scores (exact search)."""
        self._require_fitted()
        questions = check_texts(questions, "questions")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not questions:
            return []
        if self.config.encoder == "biencoder" and self._searches()["pool"].uses_faiss:
            return self._select_searched(questions, top_k)
        if self._ranker is not None:
            out = []
            cands = self._shortlist(questions, max(self.config.ranker_shortlist, top_k))
            for c, s in zip(cands, self._ranker_scores(questions, cands, from_pool=True), strict=True):
                best = np.argsort(-s, kind="stable")[:top_k]
                out.append([(c[j], float(s[j])) for j in best])
            return out
        out = []
        for s in self._pool_scores(questions):
            k = min(top_k, len(s))
            best = np.argpartition(-s, k - 1)[:k]
            best = best[np.argsort(-s[best], kind="stable")]
            out.append([(self.pool[j], float(s[j])) for j in best])
        return out

    # -- search (search.py) ----------------------------------------------------------------------------------

    def _searches(self) -> dict[str, VectorSearch]:
        """The bi-encoder's pool and training-question searches (exact or FAISS, as ``search`` decides), built on
        first use: after fit, when the bundle is saved or first searched; load reads the saved indexes."""
        if self._search is None:
            params = SearchParams.from_config(self.config)
            self._search = {"pool": VectorSearch.build(self._pool_vecs, params),
                            "questions": VectorSearch.build(self._question_vecs, params)}
        return self._search

    def _select_searched(self, questions: list[str], top_k: int) -> list[list[tuple[str, float]]]:
        """``select`` through the FAISS index: the dense score is one inner product with a composite query
        (search.py), so the index shortlists ``search_shortlist`` answers, the TF-IDF scorer (tfidf_weight > 0,
        exact) adds its own best, and the union is scored exactly; the scores are the exact path's."""
        cfg = self.config
        qv = self.encode(questions)
        top, weights = self._neighbour_weights(qv, approximate=True) if cfg.neighbours else (None, None)
        neighbour_answers = None if top is None else self._pool_vecs[self.answer_of[top]]  # (n, k, D)
        queries = composite_queries(qv, cfg.qa_weight, neighbour_answers, weights)
        extra = cfg.tfidf_weight * self._tfidf._pool_scores(questions) if self._tfidf is not None else None
        hits = shortlist_topk(queries, self._searches()["pool"], max(cfg.search_shortlist, top_k), top_k, extra)
        return [[(self.pool[j], float(s)) for j, s in zip(ids, scores, strict=True)] for ids, scores in hits]

    def reply(self, question: str) -> tuple[str, float]:
        """The best pool answer for ``question`` and its score."""
        return self.select([question], 1)[0][0]

    def familiarity(self, texts: Sequence[str]) -> list[float]:
        """How much each text looks like the training questions: its mean log-probability per character under a
        character bigram model of them (``familiarity.CharBigramModel``; < 0, higher is more familiar). The reply
        policy's ``min_familiarity`` guard reads it; the model is built on first use (thread-safe)."""
        texts = check_texts(texts, "texts")
        model = self.familiarity_model()
        return [model.score(t) for t in texts]

    def warm(self) -> None:
        """Build what serving would otherwise build on its first message: the familiarity model and, for the
        ranker, the pool's reverse neighbours (seconds for a 7,000-answer pool). ``inference.ReplySelector`` calls it
        where the bundle loads, off the event loop."""
        self.familiarity_model()
        if self._index is not None:
            for space in SPACES:
                self._index.reverse_neighbours(space, min(self.config.ranker_reverse, len(self.pool)))

    def familiarity_model(self) -> CharBigramModel:
        """The character model behind :meth:`familiarity`, built from the training questions on first use."""
        self._require_fitted()
        if self._familiarity is None:
            with self._familiarity_lock:
                if self._familiarity is None:
                    self._familiarity = CharBigramModel(self.questions)
        return self._familiarity

    # -- training ------------------------------------------------------------------------------------------

    def fit(self, questions: Sequence[str], answers: Sequence[str], valid_questions: Sequence[str] | None = None,
            valid_answers: Sequence[str] | None = None, labels: Sequence[str] | None = None) -> ResponseSelector:
        """``labels`` (one per pair, optional): used by the ranker's label-agreement features only."""
        questions, answers = check_texts(questions, "questions"), check_texts(answers, "answers")
        if len(questions) != len(answers):
            raise ValueError(f"questions and answers must have the same length, got {len(questions)} and "
                             f"{len(answers)}")
        if len(set(answers)) < 2:
            raise ValueError("response selection needs at least 2 distinct answers to train on")
        if (valid_questions is None) != (valid_answers is None):
            raise ValueError("give both valid_questions and valid_answers, or neither")
        if labels is not None:
            labels = [str(x) for x in labels]
            if len(labels) != len(questions):
                raise ValueError(f"labels must have one entry per pair, got {len(labels)} for {len(questions)}")
        if self.config.encoder == "ranker":
            self._fit_ranker(questions, answers, labels)
            return self
        self.pool, self.questions, self.answer_of = _dedupe_pairs(questions, answers)
        if self.config.encoder == "tfidf":
            self._features = TfidfFeatures.from_config(self.config)
            self._features.fit_transform(self.questions + self.pool)
        else:
            if self.config.tfidf_weight:
                self._tfidf = ResponseSelector(dataclasses.replace(self.config, encoder="tfidf", tfidf_weight=0.0,
                                                                   search="exact"))
                self._tfidf.fit(questions, answers)
            self._train_biencoder(valid_questions, valid_answers)
        self._encode_pool()
        logger.info("response selector (%s): %d pool answers from %d questions", self.config.encoder,
                    len(self.pool), len(self.questions))
        return self

    def _fit_ranker(self, questions: list[str], answers: list[str], labels: list[str] | None) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        x, y, groups, _ = cross_fit_features(questions, answers, labels, cfg, ResponseSelector)
        t1 = time.perf_counter()
        self._ranker = PairRanker(cfg.ranker, cfg.ranker_trees, cfg.ranker_depth, cfg.ranker_lr, cfg.seed,
                                  cfg.ranker_threads).fit(x, y, groups)
        self._index = FeatureIndex.fit(questions, answers, labels, cfg, make_encoder=ResponseSelector)
        self.pool, self.questions, self.answer_of = self._index.pool, self._index.questions, self._index.answer_of
        self.history.append({"ranker": cfg.ranker, "lists": len(groups), "rows": len(y),
                             "features": self._index.feature_names(cfg.ranker_neighbours),
                             "feature_seconds": round(t1 - t0, 1), "fit_seconds": round(time.perf_counter() - t1, 1)})
        logger.info("response selector (ranker %s): %d cross-fitted lists, %d pool answers from %d questions",
                    cfg.ranker, len(groups), len(self.pool), len(self.questions))

    def _encode_pool(self) -> None:
        self._pool_vecs = self.encode(self.pool)
        self._question_vecs = self.encode(self.questions)
        self._search = None  # new vectors: the searches are rebuilt on first use

    def _valid_r1(self, questions: Sequence[str], answers: Sequence[str]) -> float:
        """R@1 over the whole distinct validation answer set (harder than R@1 of 10; only for model choice)."""
        self._encode_pool()
        distinct = sorted(set(answers))
        index = {a: i for i, a in enumerate(distinct)}
        scores = self.score(list(questions), [distinct] * len(questions))
        return float(np.mean([int(np.argmax(s)) == index[a] for s, a in zip(scores, answers, strict=True)]))

    def _train_biencoder(self, valid_questions, valid_answers) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self._tok = Tokenizer.train(self.questions + self.pool, vocab_size=cfg.vocab_size, on_vocab_too_large="lower")
        self._net = self._make_net()
        q_ids, a_ids = self._ids(self.questions), self._ids(self.pool)
        answer_of = torch.as_tensor(self.answer_of)
        n, bs = len(q_ids), min(cfg.batch_size, len(q_ids))
        steps = cfg.epochs * math.ceil(n / bs)
        opt = torch.optim.AdamW(self._net.parameters(), lr=cfg.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.1)
        best, best_state = -1.0, None
        t0 = time.perf_counter()
        for epoch in range(cfg.epochs):
            self._net.train()
            total = 0.0
            perm = _epoch_perm(n, cfg.seed, epoch)
            for start in range(0, n, bs):
                b = perm[start : start + bs]
                if len(b) < 2:
                    continue
                ya = answer_of[b]
                uniq, inverse = torch.unique(ya, return_inverse=True)
                # each answer once: (B, U) and (B, B) similarities
                qa, qq = self._net.batch_sims(self._pad([q_ids[int(i)] for i in b]),
                                              self._pad([a_ids[int(j)] for j in uniq]))
                loss = _in_batch_loss_from_sims(qa, qq, inverse, cfg.temperature, cfg.qq_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(b)
            entry = {"epoch": epoch + 1, "train_loss": total / n, "seconds": round(time.perf_counter() - t0, 1)}
            if valid_questions:
                entry["valid_r1_all"] = self._valid_r1(valid_questions, valid_answers)
                if entry["valid_r1_all"] > best:
                    best = entry["valid_r1_all"]
                    best_state = {k: v.detach().clone() for k, v in self._net.state_dict().items()}
            self.history.append(entry)
            logger.info("%s epoch %d: %s", cfg.encoder, epoch + 1, entry)
        if best_state is not None:  # early stopping on validation: keep the best epoch's weights
            self._net.load_state_dict(best_state)
        self._net.eval()

    def _make_net(self) -> BiEncoder:
        cfg = self.config
        args = (self._tok.vocab_size, self._tok.pad_id, cfg.d_model, cfg.n_heads, cfg.num_layers, cfg.d_ff,
                cfg.dropout, cfg.max_len)
        return PolyEncoder(*args, codes=cfg.poly_codes) if cfg.encoder == "polyencoder" else BiEncoder(*args)

    # -- persistence (JSON + safetensors) ------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        self._require_fitted()
        d = Path(directory)
        pool = {"answers": self.pool, "questions": self.questions, "answer_of": self.answer_of.tolist()}
        if self._index is not None:  # the ranker's label-agreement features read the pairs' labels
            pool.update(labels=self._index.question_labels, label_names=self._index.label_names)
        atomic_write_json(d / POOL_FILE, pool)
        meta = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(self.config), "history": self.history}
        if self.config.encoder == "ranker":
            atomic_write_json(d / VECTORIZERS_FILE, self._index.features.to_json())
            atomic_write_json(d / RANKER_FILE, self._ranker.to_json())
            pmi = self._index.pmi
            if pmi is not None:
                atomic_write_json(d / PMI_VOCAB_FILE, {"questions": pmi.question_vocab, "answers": pmi.answer_vocab})
                np_save_file(pmi.to_arrays(), str(d / PMI_FILE))
            pair_lr = self._index.pair_lr
            if pair_lr is not None:
                atomic_write_json(d / PAIR_LR_VOCAB_FILE, {"questions": pair_lr.question_vocab,
                                                           "answers": pair_lr.answer_vocab})
                np_save_file(pair_lr.to_arrays(), str(d / PAIR_LR_FILE))
            if self._index.label_model is not None:
                np_save_file(self._index.label_model.to_arrays(), str(d / LABEL_MODEL_FILE))
            if self._index.encoder is not None:
                self._index.encoder.save(d / RANKER_ENCODER_DIR)
        elif self.config.encoder == "tfidf":
            atomic_write_json(d / VECTORIZERS_FILE, self._features.to_json())
        else:
            atomic_write_bytes(d / TOKENIZER_FILE, self._tok.to_bytes())
            d.mkdir(parents=True, exist_ok=True)
            torch_save_file({k: v.contiguous() for k, v in self._net.state_dict().items()}, str(d / ENCODER_FILE))
            # Encoded once here: loading a bundle does not re-encode its pool.
            np_save_file({"pool": self._pool_vecs, "questions": self._question_vecs}, str(d / EMBEDDINGS_FILE))
            for name, search in self._searches().items():  # built here at the latest: bundle time
                if search.uses_faiss:
                    atomic_write_bytes(d / SEARCH_FILES[name], search.to_bytes())
            if self._tfidf is not None:
                self._tfidf.save(d / TFIDF_DIR)
        atomic_write_json(d / META_FILE, meta)
        logger.info("saved response selector to %s", d)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ResponseSelector:
        d = Path(directory)
        meta = read_saved_meta(d, (META_FILE, POOL_FILE), META_FILE, FORMAT_VERSION, "ResponseSelector")
        self = cls(RetrievalConfig(**meta["config"]))
        self.history = meta.get("history", [])
        pool = json.loads((d / POOL_FILE).read_text(encoding="utf-8"))
        self.pool, self.questions = list(pool["answers"]), list(pool["questions"])
        self.answer_of = np.asarray(pool["answer_of"], dtype=np.int64)
        if self.config.encoder == "ranker":
            need = [RANKER_FILE, VECTORIZERS_FILE] + ([PMI_FILE, PMI_VOCAB_FILE] if self.config.ranker_pmi else [])
            need += [PAIR_LR_FILE, PAIR_LR_VOCAB_FILE] if self.config.ranker_pair_lr else []
            # the label classifiers exist only when the training pairs had labels
            need += [LABEL_MODEL_FILE] if self.config.ranker_label_model and pool.get("labels") is not None else []
            missing = [f for f in need if not (d / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{d} is not a saved ranker ResponseSelector: missing {', '.join(missing)}")
            features = TfidfFeatures.from_json(json.loads((d / VECTORIZERS_FILE).read_text(encoding="utf-8")))
            pmi = None
            if self.config.ranker_pmi:
                vocab = json.loads((d / PMI_VOCAB_FILE).read_text(encoding="utf-8"))
                pmi = PmiTable.from_arrays(vocab["questions"], vocab["answers"], np_load_file(str(d / PMI_FILE)))
            pair_lr = None
            if self.config.ranker_pair_lr:
                vocab = json.loads((d / PAIR_LR_VOCAB_FILE).read_text(encoding="utf-8"))
                pair_lr = PairLogistic.from_arrays(vocab["questions"], vocab["answers"],
                                                   np_load_file(str(d / PAIR_LR_FILE)))
            self._index = FeatureIndex(self.pool, self.questions, self.answer_of, features, pool.get("labels"),
                                       pool.get("label_names"), pmi, pair_lr)
            if self.config.ranker_label_model and pool.get("labels") is not None:
                self._index.label_model = LabelModel.from_arrays(np_load_file(str(d / LABEL_MODEL_FILE)))
            if self.config.ranker_encoder != "none":
                self._index.encoder = ResponseSelector.load(d / RANKER_ENCODER_DIR)
            self._ranker = PairRanker.from_json(json.loads((d / RANKER_FILE).read_text(encoding="utf-8")),
                                                self.config.ranker_threads)
            return self
        if self.config.encoder == "tfidf":
            self._features = TfidfFeatures.from_json(json.loads((d / VECTORIZERS_FILE).read_text(encoding="utf-8")))
            self._encode_pool()  # TF-IDF of the pool is cheap and exact to recompute
            return self
        missing = [f for f in (TOKENIZER_FILE, ENCODER_FILE, EMBEDDINGS_FILE) if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{d} is not a saved {self.config.encoder} ResponseSelector: "
                                    f"missing {', '.join(missing)}")
        cfg = self.config
        self._tok = Tokenizer((d / TOKENIZER_FILE).read_bytes())
        self._net = self._make_net()
        self._net.load_state_dict(torch_load_file(str(d / ENCODER_FILE)))
        self._net.eval()
        vecs = np_load_file(str(d / EMBEDDINGS_FILE))
        self._pool_vecs, self._question_vecs = vecs["pool"], vecs["questions"]
        if len(self._pool_vecs) != len(self.pool) or len(self._question_vecs) != len(self.questions):
            raise ValueError(f"{d / EMBEDDINGS_FILE} does not match {d / POOL_FILE}: "
                             f"{len(self._pool_vecs)} vs {len(self.pool)} answers")
        if cfg.tfidf_weight:
            self._tfidf = ResponseSelector.load(d / TFIDF_DIR)
        self._search = self._load_searches(d)
        return self

    def _load_searches(self, d: Path) -> dict[str, VectorSearch]:
        """The saved FAISS indexes; one the bundle lacks (saved before ``search`` existed) is built now."""
        params = SearchParams.from_config(self.config)
        out = {}
        for name, vecs in (("pool", self._pool_vecs), ("questions", self._question_vecs)):
            f = d / SEARCH_FILES[name]
            if params.uses_faiss(len(vecs)) and f.is_file():
                out[name] = VectorSearch.from_bytes(vecs, params, f.read_bytes())
            else:
                if params.uses_faiss(len(vecs)):
                    logger.warning("%s has no %s: building the FAISS index at load", d, f.name)
                out[name] = VectorSearch.build(vecs, params)
        return out


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    # The order is a function of (seed, epoch) alone, as in the Trainer's sampler.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _in_batch_loss(q: torch.Tensor, a: torch.Tensor, target: torch.Tensor, temperature: float,
                   qq_weight: float) -> torch.Tensor:
    """:func:`_in_batch_loss_from_sims` of unit question vectors ``q`` and answer vectors ``a`` (bi-encoder)."""
    return _in_batch_loss_from_sims(q @ a.T, q @ q.T, target, temperature, qq_weight)


def _in_batch_loss_from_sims(qa: torch.Tensor, qq: torch.Tensor, target: torch.Tensor, temperature: float,
                             qq_weight: float) -> torch.Tensor:
    """Question->answer cross-entropy against every distinct answer in the batch (in-batch negatives;
    an answer shared by two questions is a positive for both, never a negative), plus, weighted by
    ``qq_weight``, question->question: questions that share an answer are each other's positives.
    ``qa`` (B, U) and ``qq`` (B, B) are similarities, divided here by ``temperature``."""
    logits = qa / temperature  # (B, U)
    loss = F.cross_entropy(logits, target)
    if qq_weight:
        qq = qq / temperature  # (B, B)
        eye = torch.eye(len(qq), dtype=torch.bool)
        qq = qq.masked_fill(eye, float("-inf"))
        pos = (target[:, None] == target[None, :]) & ~eye
        has = pos.any(1)
        if has.any():
            log_p = torch.logsumexp(qq.masked_fill(~pos, float("-inf")), 1) - torch.logsumexp(qq, 1)
            loss = loss - qq_weight * log_p[has].mean()
    return loss


def build(cfg: RetrievalConfig, ctx: BuildContext) -> ResponseSelector:
    """Registry builder; the pool comes from the data at ``fit`` time."""
    return ResponseSelector(cfg)
