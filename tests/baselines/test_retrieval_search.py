"""The retrieval family's search layer: exact vs FAISS top-k, auto's choice, the saved index, bad keys."""

from __future__ import annotations

import copy
import dataclasses

import faiss
import numpy as np
import pytest
import torch
from tests.baselines.test_retrieval import A, Q

from chatforge.baselines.retrieval import ResponseSelector, RetrievalConfig
from chatforge.baselines.retrieval.model import SEARCH_FILES
from chatforge.baselines.retrieval.search import SearchParams, VectorSearch, exact_topk
from chatforge.config import validate_config


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, seed: int, clusters: int = 50) -> np.ndarray:
    """Unit vectors around ``clusters`` centres: embeddings have structure, unlike isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    return unit(centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d)))


def test_exact_topk_is_the_sorted_matrix_product():
    rng = np.random.default_rng(0)
    x, q = unit(rng.standard_normal((300, 16))), unit(rng.standard_normal((7, 16)))
    scores, ids = exact_topk(q, x, 10)
    np.testing.assert_array_equal(ids, np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.sort(q @ x.T, axis=1)[:, ::-1][:, :10], rtol=1e-6)


def test_faiss_flat_index_returns_the_exact_top_k():
    rng = np.random.default_rng(1)
    x, q = unit(rng.standard_normal((500, 32))), unit(rng.standard_normal((20, 32)))
    search = VectorSearch.build(x, SearchParams(search="faiss", index="flat"))
    assert isinstance(search.index, faiss.IndexFlatIP)
    scores, ids = search.search(q, 10)
    ref_scores, ref_ids = exact_topk(q, x, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)


def recall(ids: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, ref, strict=True)]))


def test_hnsw_recall_at_10_against_exact_on_a_seeded_pool():
    x = clustered(5000, 32, seed=2)
    q = clustered(200, 32, seed=3)
    _, ref = exact_topk(q, x, 10)
    search = VectorSearch.build(x, SearchParams(search="faiss", index="hnsw"))  # the defaults
    assert isinstance(search.index, faiss.IndexHNSWFlat)
    _, ids = search.search(q, 10)
    assert recall(ids, ref) >= 0.95
    # a graph searched with the smallest beam finds much less: the bound above is not vacuous
    weak = VectorSearch.build(x, SearchParams(search="faiss", index="hnsw", hnsw_m=4, hnsw_ef_search=1))
    assert recall(weak.search(q, 10)[1], ref) < 0.9


def test_ivf_probing_every_cell_is_exact_and_fewer_cells_lose_recall():
    x, q = clustered(4000, 16, seed=4), clustered(100, 16, seed=5)
    _, ref = exact_topk(q, x, 10)
    full = VectorSearch.build(x, SearchParams(search="faiss", index="ivf", ivf_nlist=32, ivf_nprobe=32))
    assert isinstance(full.index, faiss.IndexIVFFlat) and full.index.nlist == 32
    assert recall(full.search(q, 10)[1], ref) == 1.0
    one = VectorSearch.build(x, SearchParams(search="faiss", index="ivf", ivf_nlist=32, ivf_nprobe=1))
    assert recall(one.search(q, 10)[1], ref) < 1.0


def test_auto_uses_faiss_from_search_min_pool_rows():
    x = clustered(1000, 8, seed=6)
    params = SearchParams(search="auto", min_pool=1000)
    assert VectorSearch.build(x, params).uses_faiss
    assert not VectorSearch.build(x[:999], params).uses_faiss
    assert not VectorSearch.build(x, SearchParams(search="exact")).uses_faiss
    assert VectorSearch.build(x[:10], SearchParams(search="faiss", index="flat")).uses_faiss


TINY = dict(encoder="biencoder", vocab_size=80, d_model=16, n_heads=2, num_layers=1, d_ff=32, dropout=0.0,
            epochs=2, batch_size=12, neighbours=3, tfidf_weight=2.0)


@pytest.fixture(scope="module")
def hnsw_selector():
    torch.set_num_threads(1)
    return ResponseSelector(RetrievalConfig(**TINY, search="faiss", search_index="hnsw", search_shortlist=2)).fit(Q, A)


def exact_twin(sel: ResponseSelector) -> ResponseSelector:
    """The same fitted selector searching exactly (shares the encoder and the encoded pool)."""
    twin = copy.copy(sel)
    twin.config = dataclasses.replace(sel.config, search="exact")
    twin._search = None
    return twin


def test_selector_with_a_flat_faiss_index_selects_like_exact_search():
    torch.set_num_threads(1)
    sel = ResponseSelector(RetrievalConfig(**TINY, search="faiss", search_index="flat", search_shortlist=2)).fit(Q, A)
    assert sel._searches()["pool"].uses_faiss and sel._searches()["questions"].uses_faiss
    got, want = sel.select(Q, 4), exact_twin(sel).select(Q, 4)
    assert [[a for a, _ in r] for r in got] == [[a for a, _ in r] for r in want]
    np.testing.assert_allclose([[s for _, s in r] for r in got], [[s for _, s in r] for r in want], rtol=1e-5)


def test_auto_below_search_min_pool_searches_exactly_and_saves_no_index(tmp_path):
    torch.set_num_threads(1)
    # 6 pool answers, 12 training questions: the questions' matrix reaches the threshold, the pool does not
    sel = ResponseSelector(RetrievalConfig(**TINY, search="auto", search_min_pool=12)).fit(Q, A)
    assert not sel._searches()["pool"].uses_faiss and sel._searches()["questions"].uses_faiss
    sel.save(tmp_path)
    assert not (tmp_path / SEARCH_FILES["pool"]).exists() and (tmp_path / SEARCH_FILES["questions"]).is_file()


def test_saved_bundle_with_search_faiss_reads_its_index_and_answers_like_before_save(hnsw_selector, tmp_path,
                                                                                    monkeypatch):
    before = hnsw_selector.select(Q, 3)
    hnsw_selector.save(tmp_path)
    assert all((tmp_path / f).is_file() for f in SEARCH_FILES.values())

    def no_rebuild(self):
        raise AssertionError("load rebuilt the FAISS index instead of reading the saved one")

    monkeypatch.setattr(VectorSearch, "_build_index", no_rebuild)
    back = ResponseSelector.load(tmp_path)
    assert isinstance(back._search["pool"].index, faiss.IndexHNSWFlat)
    assert back._search["pool"].index.hnsw.efSearch == hnsw_selector.config.search_hnsw_ef_search
    assert back.select(Q, 3) == before


def test_a_bundle_saved_without_its_index_builds_it_at_load(hnsw_selector, tmp_path):
    hnsw_selector.save(tmp_path)
    (tmp_path / SEARCH_FILES["pool"]).unlink()
    back = ResponseSelector.load(tmp_path)
    assert back._search["pool"].uses_faiss
    assert [a for a, _ in back.select(Q, 1)[0]] == [a for a, _ in hnsw_selector.select(Q, 1)[0]]


def test_a_saved_index_that_does_not_match_the_pool_is_rejected(hnsw_selector, tmp_path):
    hnsw_selector.save(tmp_path)
    other = VectorSearch.build(clustered(5, 16, seed=7), SearchParams(search="faiss", index="hnsw"))
    (tmp_path / SEARCH_FILES["pool"]).write_bytes(other.to_bytes())
    with pytest.raises(ValueError, match="do not match"):
        ResponseSelector.load(tmp_path)


def model(**kw):
    return {"name": "x", "data": {"path": "sample", "format": "chatbot_csv"},
            "model": {"family": "retrieval", "task": "selection", **kw}}


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("search", "annoy", "'exact', 'faiss' or 'auto'"),
    ("search_index", "lsh", "'hnsw', 'ivf' or 'flat'"),
    ("search_hnsw_m", 0, "greater than or equal to 4"),
    ("search_ivf_nprobe", 0, "greater than or equal to 1"),
])
def test_bad_search_keys_are_rejected_naming_what_is_allowed(key, value, allowed):
    with pytest.raises(Exception, match=rf"model\.{key}: .*{allowed}"):
        validate_config(model(encoder="biencoder", **{key: value}))


@pytest.mark.parametrize("encoder", ["tfidf", "ranker", "polyencoder"])
def test_faiss_search_is_rejected_for_the_sparse_encoders(encoder):
    with pytest.raises(Exception, match="search: faiss applies to the bi-encoder"):
        validate_config(model(encoder=encoder, search="faiss"))
    assert validate_config(model(encoder=encoder, search="auto")).model.search == "auto"


def test_auto_search_never_puts_the_polyencoder_behind_an_inner_product_index():
    # The poly score attends per (question, candidate): an inner-product index of its pool vectors would
    # shortlist by a different score, so auto keeps it exact however small search_min_pool is.
    from chatforge.baselines.retrieval import RetrievalConfig
    from chatforge.baselines.retrieval.search import SearchParams

    poly = SearchParams.from_config(RetrievalConfig(encoder="polyencoder", search="auto", search_min_pool=1))
    bi = SearchParams.from_config(RetrievalConfig(encoder="biencoder", search="auto", search_min_pool=1))
    assert not poly.uses_faiss(10_000)
    assert bi.uses_faiss(10_000)


@pytest.mark.slow
def test_a_selection_run_with_search_faiss_bundles_its_index_and_serves_from_it(tmp_path):
    from chatforge.bundle import load_bundle
    from chatforge.training.run import run_experiment

    torch.set_num_threads(1)
    cfg = validate_config({
        "name": "sel", "seed": 0,
        "data": {"path": "sample", "format": "chatbot_csv", "valid_fraction": 0.1, "test_fraction": 0.2},
        "model": {"family": "retrieval", "task": "selection", **{k: v for k, v in TINY.items() if k not in ("epochs", "vocab_size")},
                  "epochs": 1, "vocab_size": 500, "search": "faiss", "search_index": "hnsw"},
        "tracking": {"enabled": False},
    })
    res = run_experiment(cfg, run_dir=tmp_path / "run")
    assert all((res.bundle_dir / f).is_file() for f in SEARCH_FILES.values())
    served = load_bundle(res.bundle_dir).model
    assert isinstance(served._search["pool"].index, faiss.IndexHNSWFlat)
    back = ResponseSelector.load(res.bundle_dir)
    questions = list(back.questions[:5])
    assert [served.reply(q) for q in questions] == [back.reply(q) for q in questions]
    assert [a for a, _ in exact_twin(back).select(questions[:1], 1)[0]] == [back.reply(questions[0])[0]]
