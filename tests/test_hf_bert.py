"""HF BERT interop: random-weight checkpoints converted both ways give the same outputs (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from chatforge.bundle import load_bundle  # noqa: E402
from chatforge.inference import Classifier, load_model  # noqa: E402
from chatforge.interop import from_hf, to_hf  # noqa: E402
from chatforge.interop.hf_bert import HFBertError  # noqa: E402

WORDS = ["hello", "world", "how", "are", "you", "fine", "thanks", "the", "a", "cat", "sat", "on", "mat",
         "##s", "##ing", "weather", "today", "good", "bad", "play", "music"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def _hf_config(**kw):
    return transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def _randomise(model):
    # Larger-than-init random weights (biases and LayerNorms too) so that a mapping slip shows.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    return model.eval()


def _save_checkpoint(model, path, safe=True):
    model.save_pretrained(path, safe_serialization=safe)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return path


def _inputs():
    ids = torch.tensor([[2, 5, 6, 7, 8, 3, 9, 10, 3], [2, 12, 13, 14, 3, 0, 0, 0, 0]])
    types = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1], [0] * 9])
    return ids, types, (ids != 0).long()


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_bert_model_from_hf_then_back(tmp_path, safe):
    hf = _randomise(transformers.BertModel(_hf_config()))
    src = _save_checkpoint(hf, tmp_path / "hf", safe)
    bundle_dir = from_hf(src, tmp_path / "bundle")
    b = load_bundle(bundle_dir)
    assert b.family == "bert" and b.task == "mlm_nsp" and b.tokenizer.kind == "hf_tokenizers"
    assert b.tokenizer.special.cls == 2 and b.tokenizer.special.mask == 4 and b.tokenizer.special.pad == 0
    assert b.tokenizer.encode("hello world") == [5, 6]
    ids, types, mask = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        h, pooled = b.model.bert(ids, types, mask)
    keep = mask.bool()
    _close(h[keep], ref.last_hidden_state[keep])
    _close(pooled, ref.pooler_output)
    meta = json.loads((bundle_dir / "metadata.json").read_text())
    assert meta["converted_from"]["architecture"] == "BertModel"
    assert "mlm_transform.weight" in meta["converted_from"]["new"]  # a bare BertModel has no heads

    out = to_hf(bundle_dir, tmp_path / "back")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    back = transformers.BertForPreTraining.from_pretrained(out).eval()
    with torch.no_grad():
        r2 = back(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
        mine = b.model(ids, types, mask).logits
    _close(r2.hidden_states[-1][keep], ref.last_hidden_state[keep])
    _close(r2.prediction_logits, mine)


def test_sequence_classification_both_directions_and_serving(tmp_path):
    hf = _randomise(transformers.BertForSequenceClassification(
        _hf_config(num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})))
    bundle_dir = from_hf(_save_checkpoint(hf, tmp_path / "hf"), tmp_path / "bundle")
    b = load_bundle(bundle_dir)
    assert b.task == "classification" and b.labels == ["neg", "neu", "pos"]
    ids, types, mask = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
        mine = b.model(ids, types, mask).logits
        h, _ = b.model.bert(ids, types, mask)
    _close(mine, ref.logits)
    _close(h[mask.bool()], ref.hidden_states[-1][mask.bool()])

    # serving builds [CLS] text [SEP] itself, exactly as HF's own tokenizer pipeline would
    c = load_model(bundle_dir, name="hf-cls")
    assert isinstance(c, Classifier)
    pred = c.classify(["hello world how are you"])[0]
    with torch.no_grad():
        p = hf(input_ids=torch.tensor([[2, 5, 6, 7, 8, 9, 3]])).logits.softmax(-1)[0]
    assert pred.label == ["neg", "neu", "pos"][int(p.argmax())] and abs(pred.score - float(p.max())) < 1e-4

    out = to_hf(bundle_dir, tmp_path / "back")
    back = transformers.BertForSequenceClassification.from_pretrained(out).eval()
    assert back.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    with torch.no_grad():
        _close(back(input_ids=ids, token_type_ids=types, attention_mask=mask).logits, mine)
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    assert fast.cls_token == "[CLS]" and fast("hello world")["input_ids"] == [2, 5, 6, 3]


def test_pretraining_heads_round_trip(tmp_path):
    hf = _randomise(transformers.BertForPreTraining(_hf_config()))
    hf.tie_weights()
    bundle_dir = from_hf(_save_checkpoint(hf, tmp_path / "hf"), tmp_path / "bundle")
    b = load_bundle(bundle_dir)
    ids, types, mask = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        _close(b.model(ids, types, mask).logits, ref.prediction_logits)
        _close(b.model.nsp_logits(ids, types, mask), ref.seq_relationship_logits)
    assert json.loads((bundle_dir / "metadata.json").read_text())["converted_from"]["new"] == []


def test_unsupported_checkpoints_are_refused(tmp_path):
    hf = transformers.BertModel(_hf_config(hidden_act="relu"))
    src = _save_checkpoint(hf, tmp_path / "hf")
    with pytest.raises(HFBertError, match="hidden_act='relu'"):
        from_hf(src, tmp_path / "bundle")
    (src / "model.safetensors").unlink()
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFBertError, match="no weights"):
        from_hf(src, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


# ------------------------------------------------ the parity matrix (issue #12, item 13): model x tokenizer layout
# fp32 on CPU: the same computation in another order differs by a few ulps (~1e-6 here); mapping slips are far above.
FP32 = dict(atol=1e-5, rtol=1e-5)
LABELED = {"BertForSequenceClassification", "BertForTokenClassification"}
BERT_CLASSES = ["BertForMaskedLM", "BertForPreTraining", "BertModel", *sorted(LABELED)]
TEXT = "hello world how are you the cat sat on the mat"


def _bert_checkpoint(tmp_path, cls: str, tok: str):
    """A random HF checkpoint as ``cls.save_pretrained`` writes it, with a tokenizer.json ("json"),
    the legacy vocab.txt ("legacy") or no tokenizer files ("none")."""
    kw = dict(num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2}) \
        if cls in LABELED else {}
    hf = _randomise(getattr(transformers, cls)(_hf_config(**kw)))
    hf.tie_weights()
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    if tok != "none":
        (src / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    if tok == "json":
        from tokenizers import BertWordPieceTokenizer

        BertWordPieceTokenizer(str(src / "vocab.txt"), lowercase=True).save(str(src / "tokenizer.json"))
        (src / "vocab.txt").unlink()
    return src, hf


def _outputs(cls: str, model, ids, types, mask) -> dict[str, torch.Tensor]:
    """What each HF class computes, by name; ``model`` is an HF model."""
    r = model(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
    out = {"hidden": r.hidden_states[-1][mask.bool()]}
    if cls == "BertModel":
        out["pooled"] = r.pooler_output
    elif cls == "BertForPreTraining":
        out["mlm"], out["nsp"] = r.prediction_logits, r.seq_relationship_logits
    elif cls == "BertForMaskedLM":
        out["mlm"] = r.logits
    else:
        out["logits"] = r.logits[mask.bool()] if cls == "BertForTokenClassification" else r.logits
    return out


@pytest.mark.parametrize("tok", ["json", "legacy"])
@pytest.mark.parametrize("cls", BERT_CLASSES)
def test_parity_matrix_from_hf_and_back(tmp_path, cls, tok, caplog):
    src, hf = _bert_checkpoint(tmp_path, cls, tok)
    with caplog.at_level("WARNING", logger="chatforge.interop.hf_bert"):
        b = load_bundle(from_hf(src, tmp_path / "bundle"))
    if cls == "BertForMaskedLM":  # saves no pooler: imported, initialised, and the tensors named
        assert "bert.pooler.dense.weight, bert.pooler.dense.bias" in caplog.text
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(src))
    assert b.tokenizer.encode(TEXT) == ref_tok(TEXT, add_special_tokens=False)["input_ids"]
    ids, types, mask = _inputs()
    keep = mask.bool()
    with torch.no_grad():
        ref = _outputs(cls, hf, ids, types, mask)
        h, pooled = b.model.bert(ids, types, mask)
        mine = {"hidden": h[keep]}
        if cls == "BertModel":
            mine["pooled"] = pooled
        elif cls in ("BertForPreTraining", "BertForMaskedLM"):
            mine["mlm"] = b.model(ids, types, mask).logits
            if cls == "BertForPreTraining":
                mine["nsp"] = b.model.nsp_logits(ids, types, mask)
        else:
            logits = b.model(ids, types, mask).logits
            mine["logits"] = logits[keep] if cls == "BertForTokenClassification" else logits
    assert mine.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], **FP32, msg=lambda m, k=k: f"{k}: {m}")

    out = to_hf(b.path, tmp_path / "back")
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    back = getattr(transformers, arch).from_pretrained(out).eval()
    prefix = "bert." if cls == "BertModel" else ""  # a bare BertModel's names lack the task model's prefix
    theirs, ours = hf.state_dict(), back.state_dict()
    for k, v in theirs.items():  # a round trip is exact: every tensor of the checkpoint, bit for bit
        if not k.endswith("position_ids"):
            assert torch.equal(ours[prefix + k], v), k
    with torch.no_grad():
        again = _outputs(arch, back, ids, types, mask)
    shared = {"BertModel": ["hidden"], "BertForMaskedLM": ["hidden", "mlm"]}.get(cls, list(ref))
    for k in shared:
        assert torch.equal(again[k], ref[k]), k


@pytest.mark.parametrize("cls", BERT_CLASSES)
def test_checkpoint_without_tokenizer_says_what_is_missing(tmp_path, cls):
    src, _ = _bert_checkpoint(tmp_path, cls, "none")
    with pytest.raises(HFBertError, match="has no tokenizer: expected tokenizer.json or vocab.txt"):
        from_hf(src, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
