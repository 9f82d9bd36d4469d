"""HF interop for the Transformer: a random-weight chatforge encoder-decoder exported to MarianMTModel gives
the same teacher-forced logits and the same greedy tokens; what Marian cannot express is refused by name.
No downloads: the bundle's tokenizer is a word list built in code."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from chatforge.bundle import build_from_config, load_bundle, save_bundle  # noqa: E402
from chatforge.config import validate_config  # noqa: E402
from chatforge.decoding import GenerationOptions, generate_batch  # noqa: E402
from chatforge.interop import ConversionError, to_hf  # noqa: E402
from chatforge.interop.hf_tokenizer import HFTokenizer  # noqa: E402
from chatforge.interop.hf_transformer import marian_order  # noqa: E402

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]", "[MASK]")
VOCAB = 61


def _tokenizer(path) -> HFTokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [*SPECIALS, *(f"w{i}" for i in range(VOCAB - len(SPECIALS)))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(list(SPECIALS))
    tk.save(str(path))
    return HFTokenizer.load(path)


def _bundle(tmp_path, task="generation", labels=None, **model):
    tok = _tokenizer(tmp_path / "tokenizer.json")
    params = {"d_model": 32, "n_heads": 4, "num_encoder_layers": 2, "num_decoder_layers": 2, "d_ff": 64,
              "dropout": 0.1, "max_len": 40, **model}
    cfg = validate_config({"name": "t", "data": {"path": "x"}, "model": {"family": "transformer", "task": task,
                                                                         **params},
                           "tracking": {"enabled": False}}, source="test")
    torch.manual_seed(0)
    m = build_from_config(cfg, tok, labels)
    with torch.no_grad():  # non-zero biases and norms, so a misplaced one shows in the logits
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return save_bundle(tmp_path / "bundle", model=m.eval(), tokenizer=tok, config=cfg, labels=labels)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(7, VOCAB, (3, 9), generator=g)
    src[1, 6:] = 0  # right-padded rows, as a batch of replies has
    src[2, 4:] = 0
    tgt = torch.cat([torch.full((3, 1), 1), torch.randint(7, VOCAB, (3, 11), generator=g)], 1)  # <s> first
    return src, tgt


@pytest.mark.parametrize("model", [{}, {"activation": "gelu"}, {"tie_embeddings": False}, {"d_model": 36}],
                         ids=["relu-tied", "gelu", "untied", "d36"])
def test_marian_export_gives_chatforges_logits_and_greedy_tokens(tmp_path, model):
    bundle = _bundle(tmp_path, **model)
    out = to_hf(bundle, tmp_path / "hf")
    hf = transformers.MarianMTModel.from_pretrained(str(out)).eval()
    mine = load_bundle(bundle).model.eval()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "marian" and cfg["decoder_start_token_id"] == 1 and cfg["pad_token_id"] == 0
    assert cfg["eos_token_id"] == 2 and cfg["scale_embedding"] is True
    assert torch.count_nonzero(hf.final_logits_bias) == 0

    src, tgt = _batch()
    with torch.no_grad():
        want = mine(src, tgt).logits
        got = hf(input_ids=src, attention_mask=(src != 0).long(), decoder_input_ids=tgt).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    opts = GenerationOptions(max_new_tokens=10, min_new_tokens=10)
    with torch.inference_mode():
        ours = generate_batch(mine, src.tolist(), opts, bos_id=1, eos_id=2, pad_id=0)
        theirs = hf.generate(src, attention_mask=(src != 0).long(), do_sample=False, num_beams=1,
                             max_new_tokens=10, min_new_tokens=10)
    # HF's output starts with the decoder start token (<s>); rows are right-padded sources.
    assert theirs[:, 0].tolist() == [1, 1, 1]
    assert theirs[:, 1:].tolist() == ours
    assert all(len(row) == 10 for row in ours)


def test_the_renumbering_is_what_makes_the_positions_agree():
    # Marian's table equals chatforge's with the model dimension renumbered, and no other order does.
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    from chatforge.modules.embeddings import sinusoidal_table

    for d in (32, 36, 7):
        theirs = MarianSinusoidalPositionalEmbedding(50, d).create_weight()
        ours = sinusoidal_table(50, d)
        torch.testing.assert_close(ours[:, marian_order(d)], theirs, atol=1e-6, rtol=0)
        assert not torch.allclose(ours, theirs, atol=1e-3)


def test_a_pre_ln_bundle_is_refused_naming_norm_first(tmp_path):
    with pytest.raises(ConversionError, match=r"norm_first=true .*allowed: norm_first=false"):
        to_hf(_bundle(tmp_path, norm_first=True), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_classification_bundle_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="classification bundle has no Hugging Face Marian equivalent"):
        to_hf(_bundle(tmp_path, task="classification", labels=["a", "b"]), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_export_loads_with_autotokenizer_and_ids_round_trip(tmp_path):
    out = to_hf(_bundle(tmp_path), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["w0", "w5"]) == [7, 12]


def test_to_ct2_gives_a_translator_with_chatforges_greedy_tokens(tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from chatforge.interop.hf_transformer import to_ct2

    bundle = _bundle(tmp_path)
    out = to_ct2(to_hf(bundle, tmp_path / "hf"), tmp_path / "ct2", "float32")
    # chatforge's special ids, not Marian's original layout: <s> starts the decoder, nothing is added to sources.
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["decoder_start_token"] == "<s>" and cfg["eos_token"] == "</s>"
    assert not cfg["add_source_bos"] and not cfg["add_source_eos"]
    words = [*SPECIALS, *(f"w{i}" for i in range(VOCAB - len(SPECIALS)))]
    src, _ = _batch()
    opts = GenerationOptions(max_new_tokens=10, min_new_tokens=10)
    with torch.inference_mode():
        ours = generate_batch(load_bundle(bundle).model.eval(), src.tolist(), opts, bos_id=1, eos_id=2, pad_id=0)
    translator = ctranslate2.Translator(str(out), device="cpu", compute_type="float32")
    results = translator.translate_batch([[words[i] for i in row if i] for row in src.tolist()], beam_size=1,
                                         max_decoding_length=10, min_decoding_length=10)
    assert [[words.index(t) for t in r.hypotheses[0]] for r in results] == ours


def test_the_export_without_its_tokenizer_has_only_the_model(tmp_path):
    out = to_hf(_bundle(tmp_path), tmp_path / "hf", tokenizer=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
