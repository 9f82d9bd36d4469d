"""The retrieval family's typed config, validated at config load."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from chatforge.baselines.retrieval.search import DEFAULT_MIN_POOL
from chatforge.baselines.tfidf import TfidfConfig


@dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class RetrievalConfig(TfidfConfig):
    """Hyper-parameters of :class:`ResponseSelector` (unknown keys and bad values are rejected).

    ``encoder``: ``tfidf`` (word + char_wb TF-IDF, the TfidfConfig keys) or ``biencoder`` (a Transformer
    encoder from ``chatforge.modules`` trained here from scratch with in-batch negatives) or ``polyencoder`` (the
    bi-encoder's network and training plus ``poly_codes`` learned codes on the question side, Humeau et al.
    2020: cos(q, c) below is then the cosine between c and the question's code vectors attended by c, and the
    nearest training questions are found with the same score).
    Scoring a candidate answer c for a question q (these three encoders):
    ``qa_weight * cos(q, c) + sum_k w_k cos(a_k, c)``, where a_k are the answers of the ``neighbours``
    training questions nearest to q and ``w = softmax(cos(q, q_k) / neighbour_temperature)``;
    ``neighbours: 0`` scores question against answer only. ``tfidf_weight > 0`` (bi-encoder only) adds the
    TF-IDF scorer's score times that weight: the two see different evidence (learned semantics; shared
    characters), so their sum ranks better than either. (Bi-encoder keys below apply to the poly-encoder too.)

    ``ranker``: a learned ranker (``chatforge.baselines.retrieval.ranker``) over TF-IDF similarity features of
    (question, candidate) -- question->answer, neighbour answers at each k of ``ranker_neighbours``, the exact
    and soft answer index, reverse neighbours, answer frequency, length and, when the data has labels, label
    agreement -- trained on cross-fitted candidate lists from the training split; ``select`` re-ranks a
    shortlist of ``ranker_shortlist`` pool answers per similarity space. ``ranker_pair_lr`` and
    ``ranker_label_model`` add learned question->answer features (a hashed n-gram pair logistic regression; label
    classifiers' agreement), fitted per cross-fitting fold; off by default (on ChatbotData they add +0.020
    validation R@1 of 10 over four seeds, at the noise level, and nothing on test; docs/results/chitchat-selection.md).

    ``search`` (bi-encoder; ``chatforge.baselines.retrieval.search``): how ``select`` finds the best pool answers
    and the nearest training questions. ``exact``: a matrix product; ``faiss``: a FAISS index of kind
    ``search_index`` (``hnsw``: ``search_hnsw_m`` links, ``search_hnsw_ef_construction``,
    ``search_hnsw_ef_search``; ``ivf``: ``search_ivf_nlist`` cells (0: 4 sqrt(n)), ``search_ivf_nprobe``
    probed; ``flat``: exact inner product) shortlists ``search_shortlist`` answers that are then scored exactly;
    ``auto``: FAISS for a matrix of at least ``search_min_pool`` vectors, exact below. The index is built at
    bundle time and saved in the bundle. TF-IDF vectors are sparse and always searched exactly, so the ``tfidf``
    and ``ranker`` encoders take ``exact`` or ``auto`` only. ``score`` (fixed candidate lists, the R@k
    benchmark) stays exact.
    """

    encoder: Literal["tfidf", "biencoder", "polyencoder", "ranker"] = "tfidf"
    neighbours: int = Field(20, ge=0, le=1000)
    neighbour_temperature: float = Field(0.05, gt=0.0, le=10.0)
    qa_weight: float = Field(1.0, ge=0.0, le=100.0)
    # bi-/poly-encoder only: add this times the TF-IDF scorer's score (same formula, TF-IDF vectors); 0 = off.
    tfidf_weight: float = Field(0.0, ge=0.0, le=100.0)
    # bi-encoder (ignored by tfidf and ranker)
    vocab_size: int = Field(4000, ge=16, le=100000)
    d_model: int = Field(128, ge=8, le=2048)
    n_heads: int = Field(4, ge=1, le=64)
    num_layers: int = Field(2, ge=1, le=24)
    d_ff: int = Field(256, ge=8, le=8192)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_len: int = Field(32, ge=4, le=512)
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(256, ge=2, le=8192)
    lr: float = Field(2.0e-3, gt=0.0, le=1.0)
    temperature: float = Field(0.05, gt=0.0, le=10.0)
    qq_weight: float = Field(0.5, ge=0.0, le=10.0)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # the range scikit-learn and NumPy take
    # poly-encoder only (ignored by the others, like the bi-encoder keys): m, the learned codes (global question vectors)
    poly_codes: int = Field(16, ge=1, le=1024)
    # ranker (ignored by the other encoders)
    ranker: Literal["xgboost", "logistic"] = "xgboost"
    ranker_folds: int = Field(5, ge=2, le=50)
    ranker_negatives: int = Field(19, ge=1, le=1000)
    ranker_neighbours: tuple[int, ...] = (5, 20, 50)
    ranker_reverse: int = Field(10, ge=1, le=1000)
    ranker_shortlist: int = Field(50, ge=1, le=100000)
    ranker_trees: int = Field(400, ge=1, le=10000)
    ranker_depth: int = Field(4, ge=1, le=16)
    ranker_lr: float = Field(0.05, gt=0.0, le=1.0)
    ranker_threads: int = Field(1, ge=1, le=256)
    ranker_pmi: bool = True  # the question->answer char-bigram PMI features
    # the question->answer hashed n-gram pair logistic regression feature (ranker.PairLogistic); off by default
    ranker_pair_lr: bool = False
    ranker_pair_lr_ngram: tuple[int, int] = (2, 2)  # char_wb n-gram sizes on both sides
    ranker_pair_lr_negatives: int = Field(5, ge=1, le=100)  # random pool answers per training pair
    ranker_pair_lr_epochs: int = Field(5, ge=1, le=100)
    ranker_pair_lr_bits: int = Field(22, ge=10, le=26)  # 2**bits hashed weights (stored sparsely)
    # with labels: p(label | q) . p(label | c) from two logistic regressions (ranker.LabelModel); off by default
    ranker_label_model: bool = False
    # a Transformer bi-/poly-encoder's score as one more feature, trained per cross-fitting fold with the bi-encoder
    # keys above (epochs, d_model, ...; poly_codes); off by default (each fold trains an encoder)
    ranker_encoder: Literal["none", "biencoder", "polyencoder"] = "none"
    # search over the bi-encoder's dense vectors (search.py)
    search: Literal["exact", "faiss", "auto"] = "auto"
    search_min_pool: int = Field(DEFAULT_MIN_POOL, ge=1)
    search_index: Literal["hnsw", "ivf", "flat"] = "hnsw"
    search_shortlist: int = Field(100, ge=1, le=100000)
    search_hnsw_m: int = Field(32, ge=4, le=256)
    search_hnsw_ef_construction: int = Field(80, ge=8, le=4096)
    search_hnsw_ef_search: int = Field(128, ge=1, le=65536)
    search_ivf_nlist: int = Field(0, ge=0, le=1 << 20)
    search_ivf_nprobe: int = Field(16, ge=1, le=1 << 20)

    @field_validator("ranker_neighbours")
    @classmethod
    def _check_ranker_neighbours(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(k < 1 or k > 1000 for k in v):
            raise ValueError(f"ranker_neighbours must be a non-empty list of neighbour counts in 1..1000, got {list(v)}")
        return tuple(v)  # a YAML list arrives as a list: one type for the saved config and comparisons

    @field_validator("ranker_pair_lr_ngram")
    @classmethod
    def _check_pair_lr_ngram(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1] <= 5:
            raise ValueError(f"ranker_pair_lr_ngram must be [min, max] with 1 <= min <= max <= 5, got {list(v)}")
        return tuple(v)

    @model_validator(mode="after")
    def _check_search(self):
        if self.search == "faiss" and self.encoder != "biencoder":
            why = ("scores each candidate with its own attention over the question's codes, not one inner product"
                   if self.encoder == "polyencoder" else "searches sparse TF-IDF vectors")
            raise ValueError(f"search: faiss applies to the bi-encoder's dense vectors; encoder {self.encoder!r} "
                             f"{why}, exactly, so use search: exact or auto (allowed with faiss: encoder biencoder)")
        return self
