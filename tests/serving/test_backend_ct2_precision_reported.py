"""``--backend ctranslate2 --precision auto``: ListModels reports the precision the model is served at, not "auto".

Found by a review: the CT2 generator's metadata said ``precision: auto`` (the request) and ``compute_type: int8``
(what chatforge asked CTranslate2 for, not what the loaded model computes in). Now ``precision`` is the resolved one,
``precision_requested`` keeps "auto", and ``compute_type`` is the loaded model's own."""

from __future__ import annotations

import pytest

from chatforge.serving.backend_ct2 import COMPUTE_TYPES, served_precision


def test_every_compute_type_chatforge_asks_for_maps_back_to_a_concrete_precision():
    for precision, compute_type in COMPUTE_TYPES.items():
        assert served_precision(compute_type) == ("int8" if precision == "auto" else precision)
    # what CTranslate2 may resolve a request to on a given CPU
    assert served_precision("int8_float32") == served_precision("int8_bfloat16") == "int8"
    assert served_precision("float32") == "fp32" and served_precision("bfloat16") == "bf16"


def test_list_models_metadata_names_the_resolved_precision(tmp_path):
    pytest.importorskip("ctranslate2", reason="the CTranslate2 backend needs chatforge[ct2]")
    pytest.importorskip("transformers", reason="the GPT bundle is converted through transformers' GPT-2")
    from tests.serving.test_backend_ct2 import _bundle

    from chatforge.serving.backend_ct2 import CT2Generator

    bundle = _bundle(tmp_path / "gpt")
    auto = CT2Generator(bundle, "chat", precision="auto")
    try:
        meta = auto.info.metadata
        assert meta["precision"] == "int8" and meta["precision_requested"] == "auto"
        assert meta["compute_type"] == auto.generator.compute_type  # the loaded model's own, e.g. int8_float32
        assert served_precision(meta["compute_type"]) == "int8"
    finally:
        auto.close()
    fp32 = CT2Generator(bundle, "chat", precision="fp32")
    try:
        assert fp32.info.metadata["precision"] == "fp32" and "precision_requested" not in fp32.info.metadata
        assert fp32.info.metadata["compute_type"] == "float32"
    finally:
        fp32.close()
