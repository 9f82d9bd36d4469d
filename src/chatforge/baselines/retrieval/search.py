"""Top-k inner-product search over a response selector's dense vectors: exact, or through a FAISS index.

The bi-encoder's score of a pool answer c is linear in c (``qa_weight * q.c + sum_k w_k a_k.c =
(qa_weight * q + sum_k w_k a_k) . c``), so the whole dense score is one inner-product search with that
composite query, and the neighbour term needs a second one (the training questions nearest to q). Both are
searches over unit vectors, where maximum inner product and nearest neighbour agree, so an ANN index built
for inner product (FAISS HNSW or IVF) serves both.

``exact`` is the matrix product and ``argpartition`` the selector always used. ``faiss`` searches a FAISS
index (``flat``: exact inner product, the reference; ``hnsw``; ``ivf``). ``auto`` picks FAISS for a matrix
of at least ``search_min_pool`` rows and exact search below it. Its default is past every size
``benchmarks/retrieval_ann.py`` measured: on this machine no pool up to 300,000 vectors gave an index at least
2x exact search's queries/s at recall@10 >= 0.95 (docs/results/chitchat-selection.md; ``benchmarks/results/retrieval-ann*.md``),
so ``auto`` searches exactly wherever the benchmark could check it.

The index is built when the selector is first searched or saved, and saved in the bundle
(``faiss.serialize_index``, FAISS's own binary format, no pickle) rather than rebuilt at load: HNSW insertion
on several OpenMP threads is not deterministic, so a rebuild could answer differently from the bundle that
was evaluated, and building costs seconds to minutes at the sizes where the index pays. The search-time
knobs (``efSearch``, ``nprobe``) are applied from the config at load, so they are not frozen into the file.
TF-IDF vectors are sparse and stay exact (FAISS has no sparse index; projecting them, e.g. with an SVD,
would change the scores the TF-IDF scorer is defined by).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SEARCH_MODES = ("exact", "faiss", "auto")
INDEX_KINDS = ("hnsw", "ivf", "flat")
# Past the largest pool measured (300,000), where no index paid at recall@10 >= 0.95: docs/results/chitchat-selection.md and
# benchmarks/results/retrieval-ann*.md. At 1,000,000 exact search costs tens of ms per message here.
DEFAULT_MIN_POOL = 1_000_000


def import_faiss():
    """The ``faiss`` module, or an ImportError that says which package provides it."""
    try:
        import faiss  # lazy: serving a bundle that searches exactly never needs it
    except ImportError as e:  # pragma: no cover - faiss-cpu is in the train extra, which the tests install
        raise ImportError("search: faiss needs the faiss-cpu package (pip install 'chatforge[train]')") from e
    return faiss


@functools.cache
def faiss_available() -> bool:
    try:
        import_faiss()
    except ImportError:
        logger.warning("faiss-cpu is not installed: search: auto searches exactly at every pool size")
        return False
    return True


@dataclass(frozen=True)
class SearchParams:
    """The ``search*`` keys of :class:`~chatforge.baselines.retrieval.config.RetrievalConfig`."""

    search: str = "auto"
    min_pool: int = DEFAULT_MIN_POOL
    index: str = "hnsw"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    ivf_nlist: int = 0
    ivf_nprobe: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        # The config validates these at load; this guards callers that build SearchParams directly.
        if self.search not in SEARCH_MODES:
            raise ValueError(f"search must be one of {', '.join(SEARCH_MODES)}, got {self.search!r}")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"search_index must be one of {', '.join(INDEX_KINDS)}, got {self.index!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> SearchParams:
        # Only the bi-encoder's score is an inner product of pool vectors with one query; the poly-encoder's
        # attention is per (question, candidate), so its pool and neighbour searches stay exact under auto.
        search = cfg.search if getattr(cfg, "encoder", "biencoder") == "biencoder" else "exact"
        return cls(search=search, min_pool=cfg.search_min_pool, index=cfg.search_index,
                   hnsw_m=cfg.search_hnsw_m, hnsw_ef_construction=cfg.search_hnsw_ef_construction,
                   hnsw_ef_search=cfg.search_hnsw_ef_search, ivf_nlist=cfg.search_ivf_nlist,
                   ivf_nprobe=cfg.search_ivf_nprobe, seed=cfg.seed)

    def uses_faiss(self, rows: int) -> bool:
        """Whether a matrix of ``rows`` vectors is searched through FAISS."""
        return self.search == "faiss" or (self.search == "auto" and rows >= self.min_pool and faiss_available())

    def nlist(self, rows: int) -> int:
        """IVF cells: ``ivf_nlist``, or 4 sqrt(rows) when 0 (FAISS's guideline), never more than rows / 39
        (k-means wants at least 39 training points per centroid)."""
        n = self.ivf_nlist or int(4 * math.sqrt(rows))
        return max(1, min(n, rows // 39 or 1))


def exact_topk(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and row ids (each (n, k), best first; ties by lower id) of the k largest inner products."""
    k = min(k, len(vectors))
    sims = np.asarray(queries @ vectors.T, dtype=np.float32)  # (n, P)
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(sims, top, axis=1)
    order = np.lexsort((top, -s), axis=1)  # score descending, then id ascending
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(top, order, axis=1).astype(np.int64)


class VectorSearch:
    """Top-k inner-product search over the rows of one (n, d) float32 matrix, exact or through FAISS."""

    def __init__(self, vectors: np.ndarray, params: SearchParams, index: Any = None) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.params = params
        self.index = index
        if index is not None:
            self._configure(index)

    @property
    def uses_faiss(self) -> bool:
        return self.index is not None

    @classmethod
    def build(cls, vectors: np.ndarray, params: SearchParams) -> VectorSearch:
        """Exact search, or a FAISS index of ``vectors`` built now, as ``params`` decide for their size."""
        self = cls(vectors, params)
        if params.uses_faiss(len(self.vectors)):
            self.index = self._build_index()
            self._configure(self.index)
        return self

    def _build_index(self):
        faiss = import_faiss()
        p, x = self.params, self.vectors
        n, d = x.shape
        if p.index == "flat":
            index = faiss.IndexFlatIP(d)
        elif p.index == "hnsw":
            index = faiss.IndexHNSWFlat(d, p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = p.hnsw_ef_construction
        else:
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, p.nlist(n), faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = p.seed  # k-means initialisation: the same pool gives the same cells
            index.train(x)
        index.add(x)
        logger.info("built a FAISS %s index over %d vectors of %d dimensions", p.index, n, d)
        return index

    def _configure(self, index) -> None:
        """Apply the search-time knobs, which are not part of what the saved index freezes."""
        faiss = import_faiss()
        if index.ntotal != len(self.vectors) or index.d != self.vectors.shape[1]:
            raise ValueError(f"the FAISS index holds {index.ntotal} vectors of {index.d} dimensions, the pool "
                             f"{len(self.vectors)} of {self.vectors.shape[1]}: the bundle's files do not match")
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = self.params.hnsw_ef_search
        elif isinstance(index, faiss.IndexIVF):
            index.nprobe = min(self.params.ivf_nprobe, index.nlist)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and row ids, each (n, min(k, rows)), best first. An approximate index may find fewer than k
        rows for a query (IVF with few probed cells): the missing places have id -1 and score -inf."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.index is None:
            return exact_topk(queries, self.vectors, k)
        k = min(k, len(self.vectors))
        scores, ids = self.index.search(queries, k)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    def to_bytes(self) -> bytes:
        if self.index is None:
            raise ValueError("exact search has no index to save")
        return import_faiss().serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, vectors: np.ndarray, params: SearchParams, data: bytes) -> VectorSearch:
        faiss = import_faiss()
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return cls(vectors, params, index)


def composite_queries(qv: np.ndarray, qa_weight: float, neighbour_answers: np.ndarray | None,
                      weights: np.ndarray | None) -> np.ndarray:
    """(n, D) vectors whose inner product with a pool vector is the selector's dense score of it:
    ``qa_weight * q + sum_k w_k a_k`` (``neighbour_answers`` (n, k, D), ``weights`` (n, k))."""
    out = qa_weight * np.asarray(qv, dtype=np.float32)
    if neighbour_answers is not None:
        out = out + np.einsum("nk,nkd->nd", weights.astype(np.float32), neighbour_answers)
    return np.ascontiguousarray(out, dtype=np.float32)


def shortlist_topk(queries: np.ndarray, search: VectorSearch, size: int, top_k: int,
                   extra: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, the ``top_k`` pool ids and their exact scores, best first: ``search`` shortlists the ``size``
    answers with the largest dense score, ``extra`` ((n, P) scores added to the dense one, e.g. the TF-IDF
    scorer's, computed exactly) adds its own ``size`` best, and the union is re-scored exactly. What can be
    lost against exact search is an answer that neither shortlist holds."""
    # Unit-norm pool vectors: the inner-product order is the cosine order, whatever the query's norm, so
    # the query is normalised for the index (HNSW's graph was built for that geometry) and scored exactly.
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    _, ids = search.search(queries / np.maximum(norms, 1e-12), size)
    out = []
    for i, row in enumerate(ids):
        cand = row[row >= 0]
        if extra is not None:
            k = min(size, extra.shape[1])
            cand = np.union1d(cand, np.argpartition(-extra[i], k - 1)[:k])
        s = search.vectors[cand] @ queries[i]
        if extra is not None:
            s = s + extra[i, cand]
        order = np.lexsort((cand, -s))[:top_k]
        out.append((cand[order], s[order].astype(np.float32)))
    return out
