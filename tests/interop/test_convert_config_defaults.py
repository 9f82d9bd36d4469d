"""`chatforge convert from-hf` on a config.json that leaves keys out, as hand-written or older configs do: transformers
fills them with its config class's defaults and loads the checkpoint, so the conversion must too (it was a KeyError
traceback). No downloads: tiny random models whose left-out sizes are transformers' defaults."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.interop.test_hf_bert import VOCAB, _inputs, _randomise  # noqa: E402
from tests.interop.test_hf_gpt import make_tokenizer_json  # noqa: E402

from chatforge.bundle import load_bundle  # noqa: E402
from chatforge.cli import app  # noqa: E402


def _drop(src, *keys):
    cfg = json.loads((src / "config.json").read_text())
    for k in keys:
        cfg.pop(k)
    (src / "config.json").write_text(json.dumps(cfg))


def test_a_gpt2_config_without_the_default_sizes_converts_like_transformers_loads_it(tmp_path):
    src = tmp_path / "hf-gpt2"
    src.mkdir()
    vocab = make_tokenizer_json(src / "tokenizer.json")
    torch.manual_seed(0)
    # n_positions and n_head at transformers' defaults (1024, 12): the config.json below leaves them out
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_embd=24, n_layer=1)).eval()
    model.save_pretrained(src)
    _drop(src, "n_positions", "n_head", "activation_function")
    assert transformers.GPT2Config.from_pretrained(src).n_positions == 1024  # what transformers reads
    r = CliRunner().invoke(app, ["convert", "from-hf", str(src), str(tmp_path / "bundle")])
    assert r.exit_code == 0, (r.output, r.exception)
    b = load_bundle(tmp_path / "bundle")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(b.model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_bert_config_without_the_default_sizes_converts(tmp_path):
    src = tmp_path / "hf-bert"
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = _randomise(transformers.BertModel(cfg))
    model.save_pretrained(src)
    (src / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    _drop(src, "max_position_embeddings", "type_vocab_size", "hidden_act")
    r = CliRunner().invoke(app, ["convert", "from-hf", str(src), str(tmp_path / "bundle")])
    assert r.exit_code == 0, (r.output, r.exception)
    b = load_bundle(tmp_path / "bundle")
    ids, types, mask = _inputs()
    with torch.no_grad():
        ref = model(input_ids=ids, token_type_ids=types, attention_mask=mask)
        h, _ = b.model.bert(ids, types, mask)
    torch.testing.assert_close(h[mask.bool()], ref.last_hidden_state[mask.bool()], atol=1e-4, rtol=1e-4)
