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

# fp32 on CPU: the same computation in a different order differs by a few ulps (~1e-6 on these logits);
# a real mismatch (e.g. exact vs tanh GELU: ~3e-4) is far above this.
FP32 = dict(atol=1e-5, rtol=1e-5)
WORDS = "hello world how are you fine thanks good bye see the a cat dog runs".split()



def make_tokenizer_json(path, specials=("<|endoftext|>",), n_filler=40):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*specials, *WORDS, *(f"w{i}" for i in range(n_filler))])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(list(specials))
    tk.save(str(path))
    return len(vocab)


CORPUS = ["hello world how are you", "fine thanks good bye", "see the cat and the dog run",
          "the cat runs", "a dog sees the world"] * 4


def _legacy_tokenizer_files(out, kind: str) -> None:
    """vocab.json + merges.txt as the original checkpoints ship them: GPT-2's byte-level BPE with
    <|endoftext|>, or openai-gpt's lower-cased BPE with </w> word ends and <unk> as its only special."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    if kind == "gpt2":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tk = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
        tk.normalizer = normalizers.BertNormalizer(lowercase=True)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>"], end_of_word_suffix="</w>")
    tk.train_from_iterator(CORPUS, trainer)
    tk.model.save(str(out))


def _hf_tokenizer(src):
    return transformers.AutoTokenizer.from_pretrained(str(src), local_files_only=True, use_fast=True)


def hf_checkpoint(tmp_path, kind: str, seed: int = 0, tok: str = "words"):
    """A tiny random HF checkpoint folder: config.json + model.safetensors + a tokenizer.

    ``tok``: "words" (a word-level tokenizer.json), "json" (the real layout's tokenizer.json as
    transformers writes it), "legacy" (vocab.json + merges.txt only) or "none" (no tokenizer files).
    """
    out = tmp_path / f"hf-{kind}-{tok}"
    out.mkdir()
    if tok == "words":
        vocab = make_tokenizer_json(out / "tokenizer.json")
    else:
        _legacy_tokenizer_files(out, kind)
        vocab = len(json.loads((out / "vocab.json").read_text()))
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
            if "c_fc.weight" in name:
                # MLP pre-activations of a few units, where exact and tanh GELU differ most (up to 5e-4):
                # at init scale they sit near 0 and an activation mix-up stays below 1e-5 in the logits.
                p.mul_(4.0)
    model.eval().save_pretrained(str(out))
    if tok == "json":
        _hf_tokenizer(out).backend_tokenizer.save(str(out / "tokenizer.json"))
    if tok in ("json", "none"):
        (out / "vocab.json").unlink()
        (out / "merges.txt").unlink()
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
    torch.testing.assert_close(mine_h, ref.hidden_states[-1], **FP32)
    torch.testing.assert_close(mine, ref.logits, **FP32)
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
    torch.testing.assert_close(ref.hidden_states[-1], mine_h, **FP32)
    torch.testing.assert_close(ref.logits, mine, **FP32)
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
        torch.testing.assert_close(hf(x).logits, model(x).logits, **FP32)


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

    with pytest.raises(TokenizerError, match=r"no begin-of-sequence \(bos\) and end-of-sequence \(eos\).*--bos-token"):
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


# ------------------------------------------------ the parity matrix (issue #12, item 13): model x tokenizer layout
TEXT = "Hello world, how are you? The cat runs."


@pytest.mark.parametrize("tok", ["json", "legacy"])
@pytest.mark.parametrize("kind", ["gpt2", "openai-gpt"])
def test_parity_matrix_from_hf_and_back(tmp_path, kind, tok):
    src, hf = hf_checkpoint(tmp_path, kind, seed=2, tok=tok)
    ref_tok = _hf_tokenizer(src)
    bundle = load_bundle(from_hf(src, tmp_path / "bundle"))
    ids = bundle.tokenizer.encode(TEXT)
    assert ids == ref_tok(TEXT, add_special_tokens=False)["input_ids"] and len(ids) > 5
    x = torch.tensor([ids, ids[::-1]])
    with torch.inference_mode():
        ref = hf(x, output_hidden_states=True)
        mine_h = bundle.model.transformer(x)
        mine = bundle.model(x).logits
    torch.testing.assert_close(mine_h, ref.hidden_states[-1], **FP32)
    torch.testing.assert_close(mine, ref.logits, **FP32)
    assert ref.logits.abs().max() > 1.0  # the comparison is not between near-zero tensors

    back = transformers.AutoModelForCausalLM.from_pretrained(str(to_hf(bundle.path, tmp_path / "back"))).eval()
    assert type(back) is type(hf)
    theirs, ours = hf.state_dict(), back.state_dict()
    assert theirs.keys() == ours.keys()
    for k in theirs:  # a round trip is exact: every tensor bit for bit
        assert torch.equal(theirs[k], ours[k]), k
    with torch.inference_mode():
        assert torch.equal(back(x).logits, ref.logits)


@pytest.mark.parametrize("kind", ["gpt2", "openai-gpt"])
def test_checkpoint_without_tokenizer_says_what_is_missing(tmp_path, kind):
    src, _ = hf_checkpoint(tmp_path, kind, tok="none")
    with pytest.raises(ConversionError, match=r"has no tokenizer: expected tokenizer.json, or vocab.json and "
                                              r"merges.txt \(missing vocab.json, merges.txt\)"):
        from_hf(src, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_openai_gpt_uses_the_tanh_gelu_like_hf(tmp_path):
    """HF's OpenAIGPT maps afn 'gelu' to the tanh approximation: the bundle must too, and export back."""
    src, _ = hf_checkpoint(tmp_path, "openai-gpt")
    bundle = load_bundle(from_hf(src, tmp_path / "bundle"))
    assert bundle.model.cfg.act == "gelu_tanh"
    back = json.loads((to_hf(bundle.path, tmp_path / "back") / "config.json").read_text())
    assert back["afn"] == "gelu"


def test_exact_gelu_gpt_is_not_exported_as_openai_gpt(tmp_path):
    from chatforge.bundle import save_bundle
    from chatforge.config import validate_config
    from chatforge.models.gpt import GPTConfig, GPTLMHeadModel

    make_tokenizer_json(tmp_path / "tokenizer.json")
    tok = HFTokenizer.load(tmp_path / "tokenizer.json")
    params = dict(variant="gpt", d_model=16, n_heads=2, n_layers=1, n_positions=16, activation="gelu")
    cfg = validate_config({"name": "t", "data": {"path": "sample"}, "model": {"family": "gpt", "task": "lm", **params}})
    model = GPTLMHeadModel(GPTConfig(**params), tok.vocab_size, tok.special, "lm").eval()
    b = save_bundle(tmp_path / "b", model=model, tokenizer=tok, config=cfg)
    with pytest.raises(ConversionError, match="activation 'gelu' has no openai-gpt equivalent.*gelu_tanh"):
        to_hf(b, tmp_path / "hf")


def test_original_openai_gpt_vocabulary_is_accepted_with_unk_as_delimiter(tmp_path, caplog):
    src, hf = hf_checkpoint(tmp_path, "openai-gpt", tok="legacy")
    with caplog.at_level("WARNING", logger="chatforge.interop.hf_gpt"):
        bundle = load_bundle(from_hf(src, tmp_path / "bundle"))
    assert "no begin/end-of-sequence tokens" in caplog.text and "--bos-token" in caplog.text
    unk = bundle.tokenizer.piece_to_id("<unk>")
    assert bundle.tokenizer.special.bos == bundle.tokenizer.special.eos == unk
    meta = json.loads((bundle.path / "metadata.json").read_text())
    assert meta["tokenizer"]["special_tokens"] == {"bos": "<unk>", "eos": "<unk>"}


def test_openai_gpt_vocabulary_without_unk_says_so(tmp_path):
    src, _ = hf_checkpoint(tmp_path, "openai-gpt", tok="legacy")
    vocab = json.loads((src / "vocab.json").read_text())
    vocab = {t: i for i, t in enumerate(t for t in vocab if t != "<unk>")}
    (src / "vocab.json").write_text(json.dumps(vocab))
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = len(vocab)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"vocab.json has no '<unk>' token"):
        from_hf(src, tmp_path / "b")


def test_gpt2_vocabulary_without_delimiters_names_the_options_and_they_work(tmp_path):
    from typer.testing import CliRunner

    from chatforge.cli import app

    src, hf = hf_checkpoint(tmp_path, "gpt2")
    make_tokenizer_json(src / "tokenizer.json", specials=("[UNK]",))  # same size, no bos/eos spelling
    with pytest.raises(ValueError, match=r"no begin-of-sequence \(bos\) and end-of-sequence \(eos\) token.*"
                                         r"--bos-token"):
        from_hf(src, tmp_path / "b")
    r = CliRunner().invoke(app, ["convert", "from-hf", str(src), str(tmp_path / "b"), "--bos-token", "hello",
                                 "--eos-token", "bye"])
    assert r.exit_code == 0, r.output
    b = load_bundle(tmp_path / "b")  # the choice is recorded in the bundle and honoured by its loader
    assert (b.tokenizer.special.bos, b.tokenizer.special.eos) == (1, 9)  # ids of "hello" and "bye"
    r = CliRunner().invoke(app, ["convert", "from-hf", str(src), str(tmp_path / "b2"), "--bos-token", "nope"])
    assert r.exit_code != 0 and "'nope' is not in the vocabulary" in r.output


def test_gpt2_prompt_containing_endoftext_keeps_every_token(tmp_path):
    """<|endoftext|> is GPT-2's bos, eos and pad: a prompt holding it is still the whole prompt."""
    src, hf = hf_checkpoint(tmp_path, "gpt2", seed=7)
    bundle = load_bundle(from_hf(src, tmp_path / "bundle"))
    assert bundle.tokenizer.special.pad == 0
    for prompt in ([5, 6, 0, 7, 8], [5, 6, 7, 0], [0, 9, 3]):
        x = torch.tensor([prompt])
        with torch.inference_mode():
            ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=8,
                              min_new_tokens=8, pad_token_id=0, eos_token_id=0)[0, len(prompt):].tolist()
        opts = GenerationOptions(max_new_tokens=8, min_new_tokens=8)
        assert generate(bundle.model, prompt, opts, bos_id=0, eos_id=0) == ref, prompt
