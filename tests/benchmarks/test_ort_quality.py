"""benchmarks/ort_quality.py's comparisons: agreement and deltas against the matching torch path and fp32."""

from __future__ import annotations

import numpy as np
import pytest
from tests.benchmarks.conftest import load


@pytest.fixture(scope="module")
def script():
    return load("ort_quality")


def test_compare_against_the_matching_path_and_fp32(script):
    ref = np.arange(1000) % 7
    int8 = ref.copy()
    int8[:3] = 99  # 3 of 1000 differ from torch fp32
    argmax = {"torch-fp32": ref, "torch-int8": int8, "ort-fp32": ref.copy(), "ort-int8": int8.copy()}
    figures = {"torch-fp32": {"in_scope_accuracy": 0.900, "oos_recall": 0.40},
               "torch-int8": {"in_scope_accuracy": 0.896, "oos_recall": 0.41},
               "ort-fp32": {"in_scope_accuracy": 0.900, "oos_recall": 0.40},
               "ort-int8": {"in_scope_accuracy": 0.894, "oos_recall": 0.41}}
    got = script.compare(figures, argmax)
    assert set(got) == {"ort-fp32 vs torch-fp32", "ort-int8 vs torch-int8", "ort-int8 vs torch-fp32",
                        "torch-int8 vs torch-fp32"}
    assert got["torch-int8 vs torch-fp32"]["argmax_agreement"] == 0.997
    assert got["ort-fp32 vs torch-fp32"]["argmax_agreement"] == 1.0
    m = got["ort-int8 vs torch-int8"]
    assert m["argmax_agreement"] == 1.0 and m["in_scope_accuracy_delta_points"] == pytest.approx(-0.2)
    assert m["in_scope_accuracy_within_0.3"]
    f = got["ort-int8 vs torch-fp32"]
    assert f["argmax_agreement"] == 0.997 and f["argmax_agreement>=0.995"]
    assert f["in_scope_accuracy_delta_points"] == pytest.approx(-0.6) and not f["in_scope_accuracy_within_0.3"]
