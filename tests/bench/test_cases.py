"""chatforge.bench.cases: ratio direction, and the SentencePiece model rebuilt in HF tokenizers."""

from __future__ import annotations

import pytest

from chatforge.bench.cases import Case, hf_tokenizer_from_sentencepiece, sample_texts


def test_ratios_say_how_much_faster_chatforge_is_for_rates_and_for_times():
    case = Case("x")
    case.engine("chatforge-fp32", "chatforge", "chatforge", "fp32")
    case.engine("anchor-fp32", "anchor", "lib", "fp32")
    case.engine("anchor-bf16", "anchor", "lib", "bf16")
    # 10 units of work: chatforge 1 s (10/s), the fp32 anchor 2 s (5/s), the bf16 anchor 0.5 s
    times = {"chatforge-fp32": [1.0], "anchor-fp32": [2.0], "anchor-bf16": [0.5]}
    case.add("rate", "items/s", True, 1, times, 10)
    case.add("time", "ms", False, 1, times, 10)
    case.compute_ratios()
    got = {(r["metric"], r["anchor"]): r["ratio"] for r in case.ratios}
    assert got == {("rate", "anchor-fp32"): 2.0, ("rate", "anchor-bf16"): 0.5,
                   ("time", "anchor-fp32"): 2.0, ("time", "anchor-bf16"): 0.5}
    rows = {(r["metric"], r["engine"]): r["value"] for r in case.rows}
    assert rows[("rate", "chatforge-fp32")] == 10.0 and rows[("time", "anchor-fp32")] == 200.0  # ms per item


def test_same_precision_ratios_pair_fp32_with_fp32_only():
    case = Case("training", same_precision_ratios=True)
    case.engine("chatforge-fp32", "chatforge", "chatforge", "fp32")
    case.engine("hf-fp32", "anchor", "transformers", "fp32")
    case.engine("hf-bf16", "anchor", "transformers", "bf16")
    case.add("tokens/s", "tokens/s", True, 8, {"chatforge-fp32": [1.0], "hf-fp32": [1.0], "hf-bf16": [1.0]}, 1)
    case.compute_ratios()
    assert [r["anchor"] for r in case.ratios] == ["hf-fp32"]


def test_skipped_engines_get_no_ratio():
    case = Case("g")
    case.engine("chatforge-fp32", "chatforge", "chatforge", "fp32")
    case.engine("ct2-int8", "anchor", "ctranslate2", "int8", "skipped", "not installed")
    case.add("tokens/s", "tokens/s", True, 1, {"chatforge-fp32": [1.0]}, 1)
    case.compute_ratios()
    assert case.ratios == []


@pytest.mark.parametrize("text", ["[MASK] 안녕  하세요", "  hello   world  ", "ＡＢＣ①", "오늘 [MASK] 날씨", "[MASK]b",
                                  "<s>x</s> [CLS] <unk>"])
def test_hf_tokenizers_copy_of_a_sentencepiece_model_encodes_the_same_ids(text):
    from chatforge.tokenizer import Tokenizer

    texts = sample_texts()
    sp = Tokenizer.train(texts, vocab_size=600)
    hf = hf_tokenizer_from_sentencepiece(sp.to_bytes())
    assert hf.get_vocab_size() == sp.vocab_size
    assert hf.encode(text, add_special_tokens=False).ids == sp.encode(text)
    assert [e.ids for e in hf.encode_batch(texts[:200], add_special_tokens=False)] == sp.encode_batch(texts[:200])
