"""chatforge ``transformer`` generation bundles -> Hugging Face ``MarianMTModel`` (optional extra ``chatforge[hf]``).

Marian (Junczys-Dowmunt et al. 2018, as transformers implements it) is the Transformer of Vaswani et al.
2017 as chatforge builds it with ``norm_first: false``: post-LN encoder and decoder layers with no final
LayerNorm and no LayerNorm on the embeddings, fixed sinusoidal positions starting at 0, token embeddings
scaled by sqrt(d_model), attention scaled by head_dim**-0.5, LayerNorm eps 1e-5, one embedding matrix for
source, target and output projection (``tie_embeddings``), and the FFN's relu or exact-erf gelu. So the
export is exact; ``tests/interop/test_hf_transformer.py`` compares the logits and the greedy tokens.

Two details do not map name for name:

* **Positions.** chatforge interleaves the sinusoids (column 2i sin, 2i+1 cos of frequency i), Marian puts
  all sines first, then all cosines. ``MarianMTModel`` does not save its position table (it is rebuilt at
  load), so the table cannot be copied over. Instead the model dimension is renumbered: every weight's
  d_model axis is reordered by ``[0, 2, 4, ..., 1, 3, 5, ...]``. Layer norms, residual additions, the
  attention heads (whose own axes are untouched) and the tied output projection are all indifferent to
  the order of the residual stream's coordinates, so the exported model computes exactly chatforge's
  function with Marian's position table.
* **Special ids.** Marian checkpoints start the decoder from the pad token; chatforge starts it from
  ``<s>``, so ``decoder_start_token_id`` is the bundle's bos, with its pad and eos ids, and no forced
  eos at the length limit (Marian's default ``forced_eos_token_id`` would end every reply early).
  ``final_logits_bias`` is zero.

What Marian cannot express is refused with :class:`ConversionError`: pre-LN (``norm_first: true``, which
adds final LayerNorms Marian has none of), and classification bundles (no Marian head classifies).

:func:`to_ct2` converts such a folder into a CTranslate2 ``Translator`` (used by ``chatforge bench`` and by
``chatforge serve --backend ctranslate2``, which may not import the bench package).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from chatforge.bundle import load_bundle
from chatforge.fileio import atomic_dir
from chatforge.interop import ConversionError
from chatforge.models.transformer.model import TransformerClassifier, TransformerSeq2Seq

logger = logging.getLogger(__name__)

# chatforge activation -> transformers' ACT2FN name (its "gelu" is the exact erf form, as torch's nn.GELU()).
_ACT_TO_HF = {"relu": "relu", "gelu": "gelu"}
# (chatforge name inside a layer, Marian name inside a layer)
_ENCODER_NORMS = (("norm1", "self_attn_layer_norm"), ("norm2", "final_layer_norm"))
_DECODER_NORMS = (("norm1", "self_attn_layer_norm"), ("norm2", "encoder_attn_layer_norm"),
                  ("norm3", "final_layer_norm"))
_ATTENTIONS = (("self_attn", "self_attn"), ("cross_attn", "encoder_attn"))


def marian_order(d_model: int) -> torch.Tensor:
    """Marian's coordinate j holds chatforge's coordinate ``order[j]``: the sine columns (chatforge's even
    ones) first, then the cosine columns (its odd ones), as ``MarianSinusoidalPositionalEmbedding`` lays
    out the same frequencies."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def state_dict_to_hf(model: TransformerSeq2Seq) -> dict[str, torch.Tensor]:
    """chatforge ``TransformerSeq2Seq`` tensors -> ``MarianMTModel`` names, in Marian's coordinate order.

    An axis of width d_model that carries the residual stream is reordered: the input axis of every
    projection reading it (q/k/v, cross-attention k/v from the encoder output, fc1, the output projection),
    the output axis of every projection writing it (attention out_proj, fc2), layer norm parameters and
    the embedding columns. The heads' own axes (q/k/v outputs, out_proj inputs) keep their order.
    """
    order = marian_order(model.cfg.d_model)
    sd = {k: v.detach() for k, v in model.state_dict().items()}

    def cols(t: torch.Tensor) -> torch.Tensor:  # (out, d_model) -> reordered input axis
        return t.index_select(1, order).contiguous()

    def rows(t: torch.Tensor) -> torch.Tensor:  # (d_model, ...) or (d_model,) -> reordered output axis
        return t.index_select(0, order).contiguous()

    out: dict[str, torch.Tensor] = {}
    src = cols(sd["src_embed.embedding.weight"])  # (V, D)
    tgt = cols(sd["tgt_embed.embedding.weight"])
    if model.cfg.tie_embeddings:
        out["model.shared.weight"] = src
    out["model.encoder.embed_tokens.weight"] = src
    out["model.decoder.embed_tokens.weight"] = tgt
    out["lm_head.weight"] = cols(sd["lm_head.weight"])
    for stack, n_layers, norms in (("encoder", model.cfg.num_encoder_layers, _ENCODER_NORMS),
                                   ("decoder", model.cfg.num_decoder_layers, _DECODER_NORMS)):
        for i in range(n_layers):
            mine, theirs = f"{stack}.layers.{i}", f"model.{stack}.layers.{i}"
            for attn, hf_attn in _ATTENTIONS:
                if f"{mine}.{attn}.q_proj.weight" not in sd:
                    continue  # the encoder has no cross-attention
                for proj in ("q_proj", "k_proj", "v_proj"):
                    out[f"{theirs}.{hf_attn}.{proj}.weight"] = cols(sd[f"{mine}.{attn}.{proj}.weight"])
                    out[f"{theirs}.{hf_attn}.{proj}.bias"] = sd[f"{mine}.{attn}.{proj}.bias"]
                out[f"{theirs}.{hf_attn}.out_proj.weight"] = rows(sd[f"{mine}.{attn}.out_proj.weight"])
                out[f"{theirs}.{hf_attn}.out_proj.bias"] = rows(sd[f"{mine}.{attn}.out_proj.bias"])
            out[f"{theirs}.fc1.weight"] = cols(sd[f"{mine}.ff.linear1.weight"])
            out[f"{theirs}.fc1.bias"] = sd[f"{mine}.ff.linear1.bias"]
            out[f"{theirs}.fc2.weight"] = rows(sd[f"{mine}.ff.linear2.weight"])
            out[f"{theirs}.fc2.bias"] = rows(sd[f"{mine}.ff.linear2.bias"])
            for norm, hf_norm in norms:
                for p in ("weight", "bias"):
                    out[f"{theirs}.{hf_norm}.{p}"] = rows(sd[f"{mine}.{norm}.{p}"])
    return out


def to_hf(bundle_dir: Path, out_dir: Path, tokenizer: bool = True) -> Path:
    """Export a ``transformer`` generation bundle as an HF ``MarianMTModel`` folder (config.json,
    model.safetensors, generation_config.json and, unless ``tokenizer`` is False, the bundle's tokenizer:
    ``serve --backend ctranslate2`` writes a vocabulary of its own instead)."""
    b = load_bundle(bundle_dir)
    if isinstance(b.model, TransformerClassifier):
        raise ConversionError(f"{bundle_dir}: a transformer classification bundle has no Hugging Face Marian "
                              "equivalent (MarianMTModel has no classification head); only task 'generation' "
                              "exports")
    if not isinstance(b.model, TransformerSeq2Seq):
        raise ConversionError(f"{bundle_dir}: only transformer generation bundles export to MarianMTModel; this "
                              f"bundle has task {b.task!r}")
    c = b.model.cfg
    if c.norm_first:
        raise ConversionError("norm_first=true (pre-LN, with a final LayerNorm after each stack) has no "
                              "MarianMTModel equivalent: Marian is post-LN with no final LayerNorm; allowed: "
                              "norm_first=false")
    act = _ACT_TO_HF.get(c.activation)
    if act is None:
        raise ConversionError(f"activation {c.activation!r} has no Marian equivalent; allowed: "
                              f"{', '.join(_ACT_TO_HF)}")
    from transformers import (  # hf extra only: transformers is not installed by chatforge[serve]/[train]
        GenerationConfig,
        MarianConfig,
        MarianMTModel,
    )

    vocab = b.model.lm_head.weight.size(0)
    s = b.tokenizer.special
    tied = c.tie_embeddings
    hf_cfg = MarianConfig(
        vocab_size=vocab, decoder_vocab_size=vocab, max_position_embeddings=c.max_len, d_model=c.d_model,
        encoder_layers=c.num_encoder_layers, decoder_layers=c.num_decoder_layers,
        encoder_attention_heads=c.n_heads, decoder_attention_heads=c.n_heads,
        encoder_ffn_dim=c.d_ff, decoder_ffn_dim=c.d_ff, activation_function=act,
        # chatforge applies its one dropout rate after the embeddings, inside attention, after the FFN's
        # activation and on every residual branch.
        dropout=c.dropout, attention_dropout=c.dropout, activation_dropout=c.dropout,
        scale_embedding=True, share_encoder_decoder_embeddings=tied, tie_word_embeddings=tied,
        pad_token_id=s.pad, bos_token_id=s.bos, eos_token_id=s.eos, decoder_start_token_id=s.bos,
        forced_eos_token_id=None)
    hf_model = MarianMTModel(hf_cfg).eval()
    missing, unexpected = hf_model.load_state_dict(state_dict_to_hf(b.model), strict=False)
    # Rebuilt by Marian itself: the sinusoid tables (never saved) and the zero final_logits_bias buffer.
    rebuilt = ("embed_positions.weight", "final_logits_bias")
    missing = [k for k in missing if not k.endswith(rebuilt) and not (tied and k == "model.shared.weight")]
    if missing or unexpected:
        raise ConversionError(f"MarianMTModel does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        hf_model.final_logits_bias.zero_()
    hf_model.generation_config = GenerationConfig(
        decoder_start_token_id=s.bos, bos_token_id=s.bos, eos_token_id=s.eos, pad_token_id=s.pad,
        forced_eos_token_id=None, max_length=c.max_len, num_beams=1, do_sample=False)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        hf_model.save_pretrained(str(tmp))
        if tokenizer:
            _write_tokenizer(b.tokenizer, tmp)
    return out_dir


def _write_tokenizer(tok, out: Path) -> None:
    if tok.kind == "hf_tokenizers":
        from transformers import PreTrainedTokenizerFast  # hf extra only: transformers is not installed

        strings = {k: v for k, v in tok.token_strings().items() if v is not None}
        PreTrainedTokenizerFast(tokenizer_object=tok.tk, **strings).save_pretrained(str(out))
    else:
        # A SentencePiece (or byte) tokenizer: copied as it is; ids are what the exported model reads.
        (out / tok.filename).write_bytes(tok.to_bytes())
        logger.warning("the bundle's %s tokenizer was copied as %s; transformers' AutoTokenizer will not load "
                       "it for a Marian folder (feed token ids, or load it with a SentencePiece tokenizer class)",
                       tok.kind, tok.filename)


def to_ct2(hf_dir: Path, out_dir: Path, quantization: str = "float32") -> Path:
    """Convert a ``MarianMTModel`` folder written by :func:`to_hf` into a CTranslate2 ``Translator`` folder.

    CTranslate2's ``TransformersConverter`` picks its ``MarianMTLoader`` for such a folder, which assumes the
    vocabulary of Marian's original checkpoints: the pad token last, its embedding row dropped, and decoding
    started from a zero embedding. chatforge's vocabulary has pad at 0 and starts the decoder from ``<s>``'s
    own embedding, so those two steps would give it a different model (the converter indeed stops on the
    vocabulary sizes). This runs the rest of that loader unchanged: ``BartLoader``, which ``MarianMTLoader``
    extends, with Marian's post-LN and no embedding LayerNorm, the decoder start token taken from
    ``decoder_start_token_id``, through CTranslate2's ``Converter`` (validation, quantization, saving). It
    leans on those CTranslate2 internals (``ctranslate2.converters.transformers.BartLoader``).

    The vocabulary is the folder's tokenizer as ``transformers.AutoTokenizer`` loads it (token strings in id
    order). ``quantization``: a CTranslate2 weight type (``float32``, ``int8``, ...).
    """
    try:  # ct2 extra only: ctranslate2 is not installed by chatforge[hf]
        from ctranslate2.converters import Converter
        from ctranslate2.converters.transformers import BartLoader
    except ImportError as e:
        raise ConversionError(f"converting to CTranslate2 needs the ctranslate2 package ({e}); "
                              "pip install 'chatforge[ct2]'") from None

    class _MarianLoader(BartLoader):
        @property
        def architecture_name(self):
            return "MarianMTModel"

        def get_model_spec(self, model):
            model.config.normalize_before = False  # what MarianMTLoader sets: post-LN ...
            model.config.normalize_embedding = False  # ... and no LayerNorm on the embeddings
            return super().get_model_spec(model)

    class _Converter(Converter):
        def _load(self):
            from transformers import AutoTokenizer, MarianMTModel

            with torch.no_grad():
                model = MarianMTModel.from_pretrained(str(hf_dir)).eval()
                return _MarianLoader()(model, AutoTokenizer.from_pretrained(str(hf_dir)))

    return Path(_Converter().convert(str(out_dir), quantization=quantization, force=True))
