"""HF interop for GPT / GPT-2: random-weight parity both directions, greedy generation token for
token, the HFTokenizer surface and the `chatforge convert` CLI. No downloads: HF models are built
from tiny configs and tokenizers from a word list in code."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from chatforge.bundle import load_bundle  # noqa: E402
from chatforge.decoding import GenerationOptions, generate  # noqa: E402
from chatforge.interop import ConversionError, from_hf, to_hf  # noqa: E402
from chatforge.interop.hf_tokenizer import HFTokenizer  # noqa: E402

WORDS = "hello world how are you fine thanks good bye see the a cat dog runs".split()



def make_tokenizer_json(path, specials=("<|endoftext|>",), n_filler=40):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*specials, *WORDS, *(f"w{i}" for i in range(n_filler))])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(list(specials))
    tk.save(str(path))
    return len(vocab)


def hf_checkpoint(tmp_path, kind: str, seed: int = 0):
    """A tiny random HF checkpoint folder (config.json + model.safetensors + tokenizer.json)."""
    out = tmp_path / f"hf-{kind}"
    out.mkdir()
    vocab = make_tokenizer_json(out / "tokenizer.json")
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, n_positions=48, n_embd=32, n_layer=2, n_head=2,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(bos_token_id=0, eos_token_id=0, **common))
    else:
        model = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**common))
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a mapping mistake shows
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.eval().save_pretrained(str(out))
    return out, model.eval()


def _ids(vocab: int, b: int = 2, t: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (b, t), generator=g)


@pytest.mark.parametrize("kind", ["gpt2", "openai-gpt"])
def test_from_hf_parity_hidden_and_logits(tmp_path, kind):
    src, hf = hf_checkpoint(tmp_path, kind)
    bundle = load_bundle(from_hf(src, tmp_path / "bundle"))
    assert bundle.tokenizer.kind == "hf_tokenizers" and bundle.family == "gpt"
    meta = json.loads((bundle.path / "metadata.json").read_text())
    assert meta["converted_from"]["model_type"] == kind and meta["tokenizer"]["file"] == "tokenizer.json"
    x = _ids(hf.config.vocab_size)
    with torch.inference_mode():
        ref = hf(x, output_hidden_states=True)
        mine_h = bundle.model.transformer(x)
        mine = bundle.model(x).logits
    torch.testing.assert_close(mine_h, ref.hidden_states[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mine, ref.logits, atol=1e-4, rtol=1e-4)
    assert ref.logits.abs().max() > 1.0  # the comparison is not between near-zero tensors


@pytest.mark.parametrize("kind", ["gpt2", "openai-gpt"])
def test_to_hf_round_trip_parity(tmp_path, kind):
    src, _ = hf_checkpoint(tmp_path, kind, seed=3)
    bundle = load_bundle(from_hf(src, tmp_path / "bundle"))
    out = to_hf(bundle.path, tmp_path / "back")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert hf.config.model_type == kind
    x = _ids(hf.config.vocab_size, seed=5)
    with torch.inference_mode():
        ref = hf(x, output_hidden_states=True)
        mine_h = bundle.model.transformer(x)
        mine = bundle.model(x).logits
    torch.testing.assert_close(ref.hidden_states[-1], mine_h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ref.logits, mine, atol=1e-4, rtol=1e-4)
    fast = transformers.AutoTokenizer.from_pretrained(str(out))
    assert fast("hello world")["input_ids"] == bundle.tokenizer.encode("hello world")


def test_trained_chatforge_gpt2_exports(tmp_path):
    """A model built by chatforge (not one that came from HF) exports and matches in HF."""
    from chatforge.bundle import save_bundle
    from chatforge.config import validate_config
    from chatforge.models.gpt import GPTConfig, GPTLMHeadModel

    make_tokenizer_json(tmp_path / "tokenizer.json")
    tok = HFTokenizer.load(tmp_path / "tokenizer.json")
    params = dict(variant="gpt2", d_model=32, n_heads=2, n_layers=1, n_positions=32, d_ff=48, init_std=0.3)
    cfg = validate_config({"name": "t", "data": {"path": "sample"}, "model": {"family": "gpt", "task": "lm", **params}})
    torch.manual_seed(0)
    model = GPTLMHeadModel(GPTConfig(**params), tok.vocab_size, tok.special, "lm").eval()
    b = save_bundle(tmp_path / "b", model=model, tokenizer=tok, config=cfg)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(to_hf(b, tmp_path / "hf"))).eval()
    x = _ids(tok.vocab_size)
    with torch.inference_mode():
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)


def test_gpt2_greedy_generation_matches_hf_token_for_token(tmp_path):
    src, hf = hf_checkpoint(tmp_path, "gpt2", seed=7)
    bundle = load_bundle(from_hf(src, tmp_path / "bundle"))
    produced: set[int] = set()
    for seed in (11, 12, 13, 14):
        prompt = _ids(hf.config.vocab_size, b=1, t=5, seed=seed)
        with torch.inference_mode():
            ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20,
                              min_new_tokens=20, pad_token_id=0, eos_token_id=0)[0, prompt.size(1):].tolist()
        opts = GenerationOptions(max_new_tokens=20, min_new_tokens=20)
        mine = generate(bundle.model, prompt[0].tolist(), opts, bos_id=0, eos_id=0)
        assert mine == ref
        produced |= set(ref)
    assert len(produced) > 3  # the continuations are not all one repeated token


def test_hf_tokenizer_surface(tmp_path):
    make_tokenizer_json(tmp_path / "tokenizer.json", specials=("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))
    tok = HFTokenizer.load(tmp_path / "tokenizer.json")
    s = tok.special
    assert (s.pad, s.unk, s.cls, s.sep, s.mask) == (0, 1, 2, 3, 4)
    assert (s.bos, s.eos) == (2, 3)  # BERT-style: [CLS]/[SEP] delimit sequences
    ids = tok.encode("hello world")
    assert ids == tok.encode_batch(["hello world"])[0] and len(ids) == 2
    assert tok.decode([s.bos, *ids, s.eos, s.pad]) == "hello world"
    assert tok.id_to_piece(ids[0]) == "hello" and tok.piece_to_id("nope") == s.unk
    assert len(tok.sha256) == 64 and tok.to_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    dec = tok.incremental_decoder()
    assert "".join(dec.feed(i) for i in ids) == "hello world"

    make_tokenizer_json(tmp_path / "gpt2.json")
    g = HFTokenizer.load(tmp_path / "gpt2.json")
    assert g.special.pad == g.special.eos == g.special.bos == g.special.unk == 0  # GPT-2: one special token


def test_hf_tokenizer_without_specials_fails_clearly(tmp_path):
    make_tokenizer_json(tmp_path / "t.json", specials=("[UNK]",))
    from chatforge.tokenizer import TokenizerError, load_tokenizer

    with pytest.raises(TokenizerError, match="begin/end-of-sequence"):
        load_tokenizer(tmp_path / "t.json", "hf_tokenizers")


def test_from_hf_rejects_unsupported(tmp_path):
    src, _ = hf_checkpoint(tmp_path, "gpt2")
    cfg = json.loads((src / "config.json").read_text())
    cfg["scale_attn_by_inverse_layer_idx"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="scale_attn_by_inverse_layer_idx"):
        from_hf(src, tmp_path / "b")
    with pytest.raises(ConversionError, match="not a Hugging Face checkpoint"):
        from_hf(tmp_path / "nothing", tmp_path / "b2")


def test_convert_cli(tmp_path):
    from typer.testing import CliRunner

    from chatforge.cli import app

    src, hf = hf_checkpoint(tmp_path, "gpt2")
    runner = CliRunner()
    r = runner.invoke(app, ["convert", "from-hf", str(src), str(tmp_path / "bundle")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["convert", "to-hf", str(tmp_path / "bundle"), str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "gpt2"
    r = runner.invoke(app, ["convert", "from-hf", str(tmp_path / "missing"), str(tmp_path / "b3")])
    assert r.exit_code != 0 and "config.json" in r.output
