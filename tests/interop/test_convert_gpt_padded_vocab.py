"""A GPT checkpoint whose embedding is padded past its tokenizer (HF checkpoints often round vocab_size up to a
multiple of 8 or 64) converts, serves and fine-tunes; the padded ids are never produced.

Found by a review: `chatforge convert from-hf` refused any checkpoint whose config.json vocab_size differed from the
tokenizer's size ("they must be equal"). Now more rows than tokenizer ids is accepted (`model.vocab_rows`), the
padded rows' logits are cut off (training, greedy and sampled decoding, the CTranslate2 backend), and only fewer rows
than ids is refused, naming both sizes. Tiny random-weight checkpoints, no downloads."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.interop.test_hf_gpt import FP32, make_tokenizer_json  # noqa: E402

from chatforge.bundle import load_bundle  # noqa: E402
from chatforge.decoding import GenerationOptions, generate  # noqa: E402
from chatforge.interop import ConversionError, from_hf, to_hf  # noqa: E402
from chatforge.models.gpt import GPTConfig, GPTLMHeadModel  # noqa: E402
from chatforge.registry import SpecialIds  # noqa: E402

PAD_TO = 64


def padded_checkpoint(tmp_path, rows: int | None = None):
    """A GPT-2 checkpoint with ``rows`` embedding rows (default: the tokenizer's size rounded up to 64), whose
    padded rows are made the most likely next tokens everywhere: a model that does not cut them off predicts them."""
    out = tmp_path / "hf-padded"
    out.mkdir()
    n_tokens = make_tokenizer_json(out / "tokenizer.json")
    rows = rows or -(-n_tokens // PAD_TO) * PAD_TO
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=rows, n_positions=48, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, initializer_range=0.3, bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        if rows > n_tokens:  # tied head: padded rows aligned with the final hidden states win every argmax
            model.transformer.wte.weight[n_tokens:] = 50.0
            model.transformer.ln_f.weight.fill_(1.0)
            model.transformer.ln_f.bias.fill_(1.0)
    model.save_pretrained(str(out))
    return out, model, n_tokens, rows


def test_padded_checkpoint_converts_and_never_produces_padded_ids(tmp_path):
    src, hf, n_tokens, rows = padded_checkpoint(tmp_path)
    assert rows > n_tokens
    bundle = load_bundle(from_hf(src, tmp_path / "bundle", task="lm"))
    model, tok = bundle.model, bundle.tokenizer
    assert tok.vocab_size == n_tokens and model.lm_head.weight.shape[0] == rows
    assert bundle.config.model.params["vocab_rows"] == rows
    x = torch.randint(1, n_tokens, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = hf(x).logits
        mine = model(x).logits
    assert ref.argmax(-1).min() >= n_tokens  # HF's own model would predict a padded id here
    assert mine.shape[-1] == n_tokens  # the padded rows' logits are cut off
    torch.testing.assert_close(mine, ref[..., :n_tokens], **FP32)  # the real ids' logits are the checkpoint's
    ids = tok.encode("hello world")
    for opts in (GenerationOptions(max_new_tokens=12), GenerationOptions(max_new_tokens=12, do_sample=True, seed=3),
                 GenerationOptions(max_new_tokens=6, num_beams=3)):
        out = generate(model, ids, opts, bos_id=tok.bos_id, eos_id=tok.eos_id)
        assert out and max(out) < n_tokens, opts
    # Training on it: the loss never sees the padded rows, so fine-tuning runs on the tokenizer's ids alone.
    model.train()
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    # Back to HF: the padded rows travel with the weights, so the round trip is the original checkpoint.
    back = transformers.AutoModelForCausalLM.from_pretrained(str(to_hf(bundle.path, tmp_path / "back"))).eval()
    assert back.config.vocab_size == rows
    with torch.inference_mode():
        torch.testing.assert_close(back(x).logits, ref, **FP32)


def test_fewer_rows_than_tokenizer_ids_is_refused_with_both_sizes(tmp_path):
    src, _, n_tokens, rows = padded_checkpoint(tmp_path, rows=40)
    assert rows < n_tokens
    with pytest.raises(ConversionError, match=rf"the tokenizer has {n_tokens} tokens but config.json says "
                                              rf"vocab_size=40: the model has no embedding row for ids 40\.\.{n_tokens - 1}"):
        from_hf(src, tmp_path / "bundle")


def test_model_refuses_vocab_rows_below_the_tokenizer():
    special = SpecialIds(pad=0, bos=1, eos=2, unk=3)
    with pytest.raises(ValueError, match="model.vocab_rows=10 is smaller than the tokenizer's 12 ids"):
        GPTLMHeadModel(GPTConfig(d_model=8, n_heads=2, n_layers=1, vocab_rows=10), 12, special)
    m = GPTLMHeadModel(GPTConfig(d_model=8, n_heads=2, n_layers=1, n_positions=16, vocab_rows=16), 12, special).eval()
    state = m.init_state(torch.tensor([[5, 6, 7]]))
    assert m.decode_step(torch.tensor([[8]]), state).shape == (1, 12)  # the cached decode path cuts them off too


def test_ctranslate2_backend_never_produces_padded_ids(tmp_path):
    pytest.importorskip("ctranslate2", reason="the CTranslate2 backend needs chatforge[ct2]")
    from chatforge.serving.backend_ct2 import CT2Generator

    src, _, n_tokens, rows = padded_checkpoint(tmp_path)
    bundle = from_hf(src, tmp_path / "bundle", task="lm")
    gen = CT2Generator(bundle, "padded", precision="fp32")
    try:
        ids = [d.token_id for d in gen.stream("hello world", GenerationOptions(max_new_tokens=8, min_new_tokens=8))]
    finally:
        gen.close()
    assert len(ids) == 8 and max(ids) < n_tokens
