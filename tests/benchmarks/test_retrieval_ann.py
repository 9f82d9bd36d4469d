"""benchmarks/retrieval_ann.py at tiny sizes: what it writes, recall against exact, and the end-to-end parity."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from tests.baselines.test_retrieval import A, Q
from tests.benchmarks.conftest import load

from chatforge.baselines.retrieval import ResponseSelector, RetrievalConfig
from chatforge.baselines.retrieval.search import SearchParams


@pytest.fixture(scope="module")
def script():
    return load("retrieval_ann")


def test_writes_json_markdown_and_plot_with_recall_against_exact(script, tmp_path):
    threads = torch.get_num_threads()
    data = script.main(["--no-real", "--sizes", "300", "800", "--queries", "12", "--repeats", "2", "--batches", "1",
                        "4", "--hnsw-ef-search", "16", "128", "--ivf-nprobe", "2", "16", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # main() puts the process's thread count back
    saved = json.loads((tmp_path / "retrieval-ann.json").read_text())
    assert saved["benchmark"] == "retrieval_ann" and saved["results"] == json.loads(json.dumps(data["results"]))
    assert saved["machine_before"]["lscpu_model_name"] and len(saved["machine_before"]["load_average"]) == 3
    assert [r["size"] for r in saved["results"]] == [300, 800]
    for r in saved["results"]:
        v = r["variants"]
        assert list(v) == ["exact", "flat", "hnsw-ef16", "hnsw-ef128", "ivf-np2", "ivf-np16"]
        assert v["ivf-np2"]["nprobe"] == 2 and v["ivf-np16"]["build_s"] == v["ivf-np2"]["build_s"]  # one index
        assert v["exact"]["memory_mb"] == pytest.approx(r["size"] * 128 * 4 / 2**20, abs=0.01)
        for name in ("exact", "flat"):  # both exact: recall 1 at every k
            assert [v[name][f"recall@{k}"] for k in (1, 10, 50)] == [1.0, 1.0, 1.0]
        for x in v.values():
            assert 0.0 <= x["recall@10"] <= 1.0 and x["build_s"] >= 0.0
            for b in (1, 4):
                assert len(x[f"batch{b}"]["seconds"]) == 2 and x[f"batch{b}"]["qps"] > 0
            assert x["batch1"]["ratio_to_exact"] == pytest.approx(x["batch1"]["qps"] / v["exact"]["batch1"]["qps"],
                                                                  abs=0.006)  # rounded to 2 decimals
        assert v["exact"]["batch4"]["ratio_to_exact"] == 1.0
    md = (tmp_path / "retrieval-ann.md").read_text()
    assert md.count("| synthetic-300 |") == 6 and "| synthetic-800 | 800 | hnsw-ef128 |" in md
    assert (tmp_path / "retrieval-ann.png").read_bytes()[:4] == b"\x89PNG"


def test_recall_counts_the_shared_ids_of_the_first_k():
    script = load("retrieval_ann")
    ref = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert script.recall(ref, ref, 4) == 1.0
    assert script.recall(np.array([[1, 9, 3, 4], [8, 7, 6, 5]]), ref, 2) == pytest.approx((0.5 + 0.0) / 2)


def test_synthetic_pool_is_seeded_unit_vectors():
    script = load("retrieval_ann")
    x, q = script.synthetic(500, 10, 16, 0.6, seed=3)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    assert x.shape == (500, 16) and q.shape == (10, 16)
    np.testing.assert_array_equal(script.synthetic(500, 10, 16, 0.6, seed=3)[0], x)
    assert not np.array_equal(script.synthetic(500, 10, 16, 0.6, seed=4)[0], x)


def test_end_to_end_with_a_flat_index_agrees_with_exact_search(script):
    torch.set_num_threads(1)
    cfg = RetrievalConfig(encoder="biencoder", vocab_size=80, d_model=16, n_heads=2, num_layers=1, d_ff=32,
                          dropout=0.0, epochs=1, batch_size=12, neighbours=3, tfidf_weight=2.0)
    sel = ResponseSelector(cfg).fit(Q, A)
    params = dataclasses.replace(SearchParams(search="faiss"), index="flat")
    res = script.end_to_end(sel, {"questions": Q}, params, repeats=1)
    assert list(res["variants"]) == ["exact", "flat", "hnsw"]
    for v in res["variants"].values():
        assert v["top1_agreement"] == 1.0 and v["recall@10"] == 1.0  # of a 6-answer pool: all 6
        assert v["ms_per_message"] > 0


def row(size: int, ratio1: float, ratio32: float, r10: float) -> dict:
    return {"size": size, "variants": {"hnsw": {"recall@10": r10, "batch1": {"ratio_to_exact": ratio1},
                                                "batch32": {"ratio_to_exact": ratio32}}}}


def test_pays_from_is_the_first_size_from_which_every_larger_one_pays():
    script = load("retrieval_ann")
    rows = [row(100_000, 9.0, 4.0, 0.97), row(7_000, 2.1, 2.5, 0.98), row(10_000, 2.5, 1.2, 0.99),
            row(30_000, 4.0, 2.0, 0.96)]
    assert script.pays_from(rows, "hnsw", [1, 32]) == 30_000  # 7k pays, 10k does not at batch 32: 30k
    assert script.pays_from(rows, "hnsw", [1]) == 7_000
    rows[0] = row(100_000, 9.0, 4.0, 0.90)  # recall below the bound at the largest size: never
    assert script.pays_from(rows, "hnsw", [1, 32]) is None


def test_render_rewrites_markdown_from_the_json(script, tmp_path):
    script.main(["--no-real", "--sizes", "300", "--queries", "8", "--repeats", "1", "--batches", "1",
                 "--variants", "exact", "flat", "--out", str(tmp_path)])
    (tmp_path / "retrieval-ann.md").unlink()
    data = script.main(["--render", str(tmp_path / "retrieval-ann.json")])
    assert "flat" in data["pays_from"] and "Pays (>= 2x" in (tmp_path / "retrieval-ann.md").read_text()
