"""chatforge.bench.cases: ratio direction, the seq2seq case at smoke size, and the SentencePiece model rebuilt in
HF tokenizers."""

from __future__ import annotations

import pytest

from chatforge.bench.cases import SMOKE, Assets, Case, hf_tokenizer_from_sentencepiece, run_case, sample_texts


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


def test_seq2seq_case_times_every_engine_and_the_fp32_engines_give_the_same_tokens(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("ctranslate2")
    steps = []
    case = run_case("seq2seq", Assets(tmp_path, SMOKE), threads=1, repeats=1, step=steps.append)
    assert case.status == "ok", case.reason
    ran = {n for n, e in case.engines.items() if e["status"] == "ok"}
    assert {"chatforge-fp32", "hf-fp32", "ct2-float32", "ct2-int8"} <= ran
    for metric in ("tokens/s", "time to first token"):
        assert {r["batch"] for r in case.rows if r["metric"] == metric} == set(SMOKE.gen_batches)
        assert {r["engine"] for r in case.rows if r["metric"] == metric} == ran
    # The same weights through MarianMTModel and a CTranslate2 Translator: greedy tokens equal chatforge's.
    agree = case.agreement
    assert agree["fp32_anchors"] == ["hf-fp32", "ct2-float32"] and agree["identical_fp32"] is True
    assert agree["identical_fraction"]["hf-fp32"] == agree["identical_fraction"]["ct2-float32"] == 1.0
    assert agree["distinct_tokens"] > 1
    pairs = {(r["chatforge"], r["anchor"]) for r in case.ratios}
    assert {("chatforge-fp32", a) for a in ("hf-fp32", "ct2-float32", "ct2-int8")} <= pairs
    assert all(r["ratio"] > 0 for r in case.ratios)
    assert any("CTranslate2" in s for s in steps)


def test_classification_case_runs_the_transformer_encoder_against_onnx_runtime_on_its_own_metrics(tmp_path):
    pytest.importorskip("onnxruntime")
    case = run_case("classification", Assets(tmp_path, SMOKE), threads=1, repeats=1, step=lambda _: None)
    assert case.status == "ok", case.reason
    rows = {(r["metric"], r["engine"]) for r in case.rows}
    for metric in ("transformer latency", "transformer throughput"):
        assert {(metric, e) for e in ("chatforge-transformer-fp32", "ort-transformer-fp32",
                                      "ort-transformer-int8")} <= rows
    assert ("latency", "ort-transformer-fp32") not in rows  # BERT's metrics stay BERT's
    # Each chatforge engine is compared with its own model's anchors only.
    for r in case.ratios:
        assert ("transformer" in r["chatforge"]) == ("transformer" in r["anchor"]) == ("transformer" in r["metric"])
    assert any(r["anchor"] == "ort-transformer-fp32" for r in case.ratios)
    agree = case.agreement["transformer"]
    # The ONNX graph is the chatforge model's own: fp32 logits equal to rounding.
    assert agree["reference"] == "chatforge-transformer-fp32"
    assert agree["max_abs_logit_diff"]["ort-transformer-fp32"] < 1e-4
    assert agree["argmax_agreement"]["ort-transformer-fp32"] == 1.0 and agree["distinct_predictions"] > 1


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
