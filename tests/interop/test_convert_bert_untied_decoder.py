"""`convert from-hf` of a BertForMaskedLM trained with tie_word_embeddings: false: chatforge's masked-LM head is tied
to the word embeddings, so the checkpoint's own decoder matrix was dropped without a word (it was even left out of the
"dropped" list) and the bundle's masked-LM logits silently differed from the checkpoint's. It is now named in a
warning and in metadata.json's converted_from.dropped."""

from __future__ import annotations

import json
import logging

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.interop.test_hf_bert import VOCAB, _hf_config, _randomise  # noqa: E402

from chatforge.interop import from_hf  # noqa: E402


def _mlm(tmp_path, tie):
    src = tmp_path / f"hf-mlm-{tie}"
    model = _randomise(transformers.BertForMaskedLM(_hf_config(tie_word_embeddings=tie)))
    model.save_pretrained(src)
    (src / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return src


def test_an_untied_decoder_is_named_not_dropped_silently(tmp_path, caplog):
    src = _mlm(tmp_path, tie=False)
    with caplog.at_level(logging.WARNING, logger="chatforge.interop.hf_bert"):
        out = from_hf(src, tmp_path / "bundle")
    assert "masked-LM decoder (cls.predictions.decoder.weight) is not tied" in caplog.text
    meta = json.loads((out / "metadata.json").read_text())
    assert "cls.predictions.decoder.weight" in meta["converted_from"]["dropped"]


def test_a_tied_decoder_converts_without_that_warning(tmp_path, caplog):
    src = _mlm(tmp_path, tie=True)
    with caplog.at_level(logging.WARNING, logger="chatforge.interop.hf_bert"):
        out = from_hf(src, tmp_path / "bundle")
    assert "not tied" not in caplog.text
    assert "cls.predictions.decoder.weight" not in json.loads((out / "metadata.json").read_text())["converted_from"]["dropped"]
