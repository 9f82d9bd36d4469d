"""benchmarks/clinc150_oos_scores.py: the nearest-neighbour score is one minus the k-th largest similarity."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from tests.benchmarks.conftest import load


@pytest.mark.parametrize("sparse", [False, True])
def test_knn_score_is_one_minus_the_kth_largest_cosine(sparse):
    script = load("clinc150_oos_scores")
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(50, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    x = rng.normal(size=(7, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ bank.T
    for k in (1, 3, 50):
        expected = 1.0 - np.sort(sims, axis=1)[:, -k]
        b, q = (sp.csr_matrix(bank), sp.csr_matrix(x)) if sparse else (bank, x)
        np.testing.assert_allclose(script.knn_score(b, q, k, chunk=3), expected, rtol=1e-5, atol=1e-6)
    # a row of the bank itself is at distance 0 from its nearest neighbour
    np.testing.assert_allclose(script.knn_score(bank, bank[:5], 1), 0.0, atol=1e-5)
