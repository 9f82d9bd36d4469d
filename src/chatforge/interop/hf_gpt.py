"""GPT / GPT-2 checkpoints <-> chatforge ``gpt`` bundles (optional extra ``chatforge[hf]``).

``from_hf`` reads an ``OpenAIGPTModel``/``OpenAIGPTLMHeadModel`` (``model_type: openai-gpt``) or
``GPT2Model``/``GPT2LMHeadModel`` (``model_type: gpt2``) folder: ``config.json``, the weights (one file or
shards, :mod:`chatforge.interop.hf_weights`; no pickled code runs) and the
tokenizer (``tokenizer.json``, else built by transformers' fast tokenizer from the folder's files).
Weights map 1:1; HF's ``Conv1D`` stores (in, out) matrices, so they are transposed.

``to_hf`` writes a ``GPT2LMHeadModel`` (variant gpt2) or ``OpenAIGPTLMHeadModel`` (variant gpt)
with ``save_pretrained`` plus the bundle's tokenizer.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from chatforge.bundle import build_from_config, load_bundle, save_bundle
from chatforge.config import validate_config
from chatforge.fileio import atomic_dir
from chatforge.interop import ConversionError, read_hf_config
from chatforge.interop.hf_tokenizer import _BOS, _EOS, HFTokenizer
from chatforge.interop.hf_weights import read_hf_weights
from chatforge.models.gpt import GPTLMHeadModel

logger = logging.getLogger(__name__)

# HF's activation names -> chatforge's, per model type. OpenAIGPT's ``afn: "gelu"`` is the tanh
# approximation (its ACT_FNS maps "gelu" to gelu_new, as the original GPT code computed it), while
# GPT-2's ``activation_function: "gelu"`` is the exact erf form.
_ACT_FROM_HF = {
    "gpt2": {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"},
    "openai-gpt": {"gelu": "gelu_tanh", "relu": "relu"},
}
_ACT_TO_HF = {"gpt2": {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"},
              "openai-gpt": {"gelu_tanh": "gelu", "relu": "relu"}}
# (chatforge name inside a block, HF name inside a block, transpose: HF Conv1D is (in, out))
_BLOCK_MAP = (
    ("attn.qkv_proj", "attn.c_attn", True),
    ("attn.out_proj", "attn.c_proj", True),
    ("mlp.linear1", "mlp.c_fc", True),
    ("mlp.linear2", "mlp.c_proj", True),
    ("ln_1", "ln_1", False),
    ("ln_2", "ln_2", False),
)


def gpt_config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """HF config.json (openai-gpt or gpt2) -> GPTConfig keyword arguments."""
    mt = hf.get("model_type")
    if mt not in ("openai-gpt", "gpt2"):
        raise ConversionError(f"model_type {mt!r} is not a GPT checkpoint; supported: openai-gpt, gpt2")
    act_key = "afn" if mt == "openai-gpt" else "activation_function"
    act = hf.get(act_key, "gelu" if mt == "openai-gpt" else "gelu_new")
    if act not in _ACT_FROM_HF[mt]:
        raise ConversionError(f"{act_key}={act!r} is not supported for {mt}; supported: {', '.join(_ACT_FROM_HF[mt])}")
    if mt == "gpt2":
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
            if hf.get(key, ok) != ok:
                raise ConversionError(f"GPT-2 option {key}={hf[key]!r} is not supported; chatforge needs {ok!r}")
    if hf.get("embd_pdrop", 0.1) != hf.get("resid_pdrop", 0.1):
        logger.warning("embd_pdrop=%s differs from resid_pdrop=%s; chatforge uses resid_pdrop for both",
                       hf.get("embd_pdrop"), hf.get("resid_pdrop"))
    d = hf["n_embd"]
    return {
        "variant": "gpt2" if mt == "gpt2" else "gpt",
        "d_model": d, "n_heads": hf["n_head"], "n_layers": hf["n_layer"],
        "d_ff": hf.get("n_inner") or 4 * d, "n_positions": hf["n_positions"],
        "dropout": hf.get("resid_pdrop", 0.1), "attn_dropout": hf.get("attn_pdrop", 0.1),
        "activation": _ACT_FROM_HF[mt][act], "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": hf.get("tie_word_embeddings", True), "init_std": hf.get("initializer_range", 0.02),
    }


def state_dict_from_hf(sd: dict[str, torch.Tensor], model_type: str, n_layers: int,
                       tie: bool = True) -> dict[str, torch.Tensor]:
    """HF tensors (with or without the ``transformer.`` prefix) -> chatforge ``GPTLMHeadModel`` names."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    emb = ("wte", "wpe") if model_type == "gpt2" else ("tokens_embed", "positions_embed")
    out = {"transformer.wte.embedding.weight": sd[f"{emb[0]}.weight"],
           "transformer.wpe.embedding.weight": sd[f"{emb[1]}.weight"]}
    for i in range(n_layers):
        for mine, theirs, transpose in _BLOCK_MAP:
            for p in ("weight", "bias"):
                key = f"h.{i}.{theirs}.{p}"
                if key not in sd:
                    raise ConversionError(f"the checkpoint has no tensor {key!r}")
                t = sd[key]
                out[f"transformer.blocks.{i}.{mine}.{p}"] = t.t().contiguous() if transpose and p == "weight" else t
    if "ln_f.weight" in sd:
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
    if tie or "lm_head.weight" not in sd:
        out["lm_head.weight"] = out["transformer.wte.embedding.weight"]
    else:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], model_type: str, n_layers: int) -> dict[str, torch.Tensor]:
    """chatforge ``GPTLMHeadModel`` tensors -> HF ``*LMHeadModel`` names."""
    emb = ("wte", "wpe") if model_type == "gpt2" else ("tokens_embed", "positions_embed")
    out = {f"transformer.{emb[0]}.weight": sd["transformer.wte.embedding.weight"],
           f"transformer.{emb[1]}.weight": sd["transformer.wpe.embedding.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(n_layers):
        for mine, theirs, transpose in _BLOCK_MAP:
            for p in ("weight", "bias"):
                t = sd[f"transformer.blocks.{i}.{mine}.{p}"]
                out[f"transformer.h.{i}.{theirs}.{p}"] = t.t().contiguous() if transpose and p == "weight" else t
    if "transformer.ln_f.weight" in sd:
        out["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"]
        out["transformer.ln_f.bias"] = sd["transformer.ln_f.bias"]
    return out


def _load_hf_tokenizer(src: Path, model_type: str, special_tokens: dict[str, str]):
    path = src / "tokenizer.json"
    if path.is_file():
        doc = path.read_bytes()  # kept byte for byte in the bundle
        tk = _read_tokenizer_json(path)
    else:
        tk = _build_tokenizer(src, model_type)
        doc = tk.to_str().encode("utf-8")
    vocab = tk.get_vocab(with_added_tokens=True)
    chosen = dict(special_tokens)
    if (model_type == "openai-gpt" and "bos" not in chosen and "eos" not in chosen and "<unk>" in vocab
            and not any(t in vocab for t in (*_BOS, *_EOS))):
        # The original openai-gpt vocabulary has no sequence delimiters at all, only <unk>; HF's model has
        # no bos/eos either. chatforge needs ids for both: <unk> stands in, so generation ends at
        # max_new_tokens (or if the model ever predicts <unk>).
        chosen.update(bos="<unk>", eos="<unk>")
        logger.warning("%s: the openai-gpt vocabulary has no begin/end-of-sequence tokens; using '<unk>' for "
                       "both (pass --bos-token/--eos-token to choose others)", src)
    return HFTokenizer(doc, str(path) if path.is_file() else None, special_tokens=chosen)


def _read_tokenizer_json(path: Path):
    from tokenizers import Tokenizer  # hf extra only: tokenizers is not installed by chatforge[serve]/[train]

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ConversionError(f"{path} is not a valid Hugging Face tokenizer: {e}") from None


def _build_tokenizer(src: Path, model_type: str):
    """The fast tokenizer transformers builds from the legacy files (vocab.json + merges.txt)."""
    missing = [n for n in ("vocab.json", "merges.txt") if not (src / n).is_file()]
    if missing:
        raise ConversionError(
            f"{src} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt "
            f"(missing {', '.join(missing)}). Copy the checkpoint's tokenizer files into the folder "
            f"(e.g. tokenizer.save_pretrained('{src}') in transformers)")
    if model_type == "openai-gpt":
        try:
            legacy = json.loads((src / "vocab.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConversionError(f"{src / 'vocab.json'} is not a JSON vocabulary: {e}") from None
        if "<unk>" not in legacy:
            # transformers' OpenAIGPTTokenizer then appends <unk> as an extra token, one past the model's
            # embedding rows, and the counts disagree for a reason no count would tell.
            raise ConversionError(
                f"{src / 'vocab.json'} has no '<unk>' token: transformers' OpenAIGPTTokenizer adds one as token "
                f"{len(legacy)}, beyond the model's {len(legacy)} embedding rows. Convert with a tokenizer.json, "
                f"or give vocab.json a '<unk>' entry within its ids")
    try:
        from transformers import (
            AutoTokenizer,  # hf extra only: transformers is not installed by chatforge[serve]/[train]
        )

        fast = AutoTokenizer.from_pretrained(str(src), local_files_only=True, use_fast=True)
        return fast.backend_tokenizer
    except Exception as e:
        raise ConversionError(f"{src}: no tokenizer.json and transformers could not build one from "
                              f"vocab.json + merges.txt: {e}") from None


def _run_name(src: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", src.resolve().name).strip("-.") or "converted"
    return name if name[0].isalnum() else f"hf-{name}"


def from_hf(src: Path, out_bundle: Path, *, task: str = "lm", name: str | None = None,
            bos_token: str | None = None, eos_token: str | None = None) -> Path:
    """Convert an HF GPT/GPT-2 checkpoint folder into a chatforge bundle (task ``lm`` or ``generation``).

    ``bos_token``/``eos_token`` name the sequence delimiters when the vocabulary does not spell them
    conventionally (see :mod:`chatforge.interop.hf_tokenizer`)."""
    if task not in ("lm", "generation"):
        raise ConversionError(f"task={task!r}: a GPT checkpoint converts to task 'lm' or 'generation'")
    hf = read_hf_config(src, ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size"))
    params = gpt_config_from_hf(hf)
    chosen = {k: v for k, v in (("bos", bos_token), ("eos", eos_token)) if v is not None}
    tok = _load_hf_tokenizer(src, hf["model_type"], chosen)
    if tok.vocab_size > hf["vocab_size"]:
        # Every tokenizer id needs an embedding row; a tokenizer with more ids is not this checkpoint's.
        extra = [tok.tk.id_to_token(i) for i in range(hf["vocab_size"], tok.vocab_size)]
        raise ConversionError(
            f"the tokenizer has {tok.vocab_size} tokens but config.json says vocab_size={hf['vocab_size']}: the "
            f"model has no embedding row for ids {hf['vocab_size']}..{tok.vocab_size - 1} (e.g. {extra[:5]}); "
            f"allowed: vocab_size >= the tokenizer's size (rows past it are padding). Is this the checkpoint's "
            f"own tokenizer?")
    if tok.vocab_size < hf["vocab_size"]:
        # HF checkpoints often pad the embedding to a multiple of 8 or 64 for the matmul kernels: the extra rows
        # stand for no token, and the model cuts their logits off (model.vocab_rows).
        params["vocab_rows"] = hf["vocab_size"]
        logger.info("%s: the embedding has %d rows for the tokenizer's %d tokens; the %d rows past it are padding "
                    "and never predicted", src, hf["vocab_size"], tok.vocab_size, hf["vocab_size"] - tok.vocab_size)
    half = max(2, hf["n_positions"] // 2)
    cfg = validate_config({
        "name": name or _run_name(src),
        "data": {"path": str(src)},  # where the weights came from; set a corpus to fine-tune
        "model": {"family": "gpt", "task": task, **params},
        "train": {"max_source_len": min(half, 8192), "max_target_len": min(half, 8192)},
        "tracking": {"enabled": False},
    }, source=str(src / "config.json"))
    model = build_from_config(cfg, tok, None)
    theirs = read_hf_weights(src)
    sd = state_dict_from_hf(theirs, hf["model_type"], params["n_layers"], params["tie_embeddings"])
    mine = model.state_dict()
    for k, t in sd.items():  # load_state_dict's size-mismatch RuntimeError would be a traceback in chatforge's names
        if k in mine and t.shape != mine[k].shape:
            name, transposed = _hf_key(k, hf["model_type"])
            want = tuple(mine[k].shape)[::-1] if transposed else tuple(mine[k].shape)
            raise ConversionError(f"{name}: shape {tuple(t.shape)[::-1] if transposed else tuple(t.shape)} in the "
                                  f"checkpoint, {want} expected from {src / 'config.json'}")
    read = {_hf_key(k, hf["model_type"])[0] for k in sd}
    beyond = sorted(k for k in theirs if re.match(r"(transformer\.)?h\.\d+\.", k)
                    and k.removeprefix("transformer.") not in read and not k.endswith((".attn.bias", ".attn.masked_bias")))
    if beyond:  # the bundle would silently be a smaller model than the checkpoint
        raise ConversionError(f"the checkpoint has blocks that {src / 'config.json'} does not describe "
                              f"(n_layer={params['n_layers']}): {', '.join(beyond[:3])}{', ...' if len(beyond) > 3 else ''}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConversionError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    meta = {"converted_from": {"format": "huggingface", "model_type": hf["model_type"], "source": str(src)}}
    return save_bundle(out_bundle, model=model.eval(), tokenizer=tok, config=cfg, extra_metadata=meta)


def _hf_key(mine: str, model_type: str) -> tuple[str, bool]:
    """The checkpoint's name (without ``transformer.``) of chatforge's tensor ``mine``, and whether it is transposed."""
    emb = ("wte", "wpe") if model_type == "gpt2" else ("tokens_embed", "positions_embed")
    if mine.startswith(("transformer.wte.", "transformer.wpe.")):
        return f"{emb[0] if '.wte.' in mine else emb[1]}.weight", False
    m = re.fullmatch(r"transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)", mine)
    if m:
        theirs, transpose = next((t, tr) for my, t, tr in _BLOCK_MAP if my == m[2])
        return f"h.{m[1]}.{theirs}.{m[3]}", transpose and m[3] == "weight"
    return mine.removeprefix("transformer."), False


def to_hf(bundle_dir: Path, out_dir: Path) -> Path:
    """Export a ``gpt`` bundle (task lm/generation) as an HF ``GPT2LMHeadModel``/``OpenAIGPTLMHeadModel``."""
    b = load_bundle(bundle_dir)
    if not isinstance(b.model, GPTLMHeadModel):
        raise ConversionError(f"{bundle_dir}: only gpt language models (task lm/generation) export to HF; "
                              f"this bundle has task {b.task!r}")
    c = b.model.cfg
    if not c.bias:
        raise ConversionError("bias=false has no HF GPT equivalent (Conv1D layers always have a bias)")
    hf_type = "gpt2" if (c.pre_ln and c.has_final_norm) else "openai-gpt" if not (c.pre_ln or c.has_final_norm) else None
    if hf_type is None:
        raise ConversionError(f"norm_first={c.pre_ln} with final_norm={c.has_final_norm} matches neither "
                              f"GPT (post-LN, no final norm) nor GPT-2 (pre-LN + final norm)")
    from transformers import (  # hf extra only: transformers is not installed
        GPT2Config,
        GPT2LMHeadModel,
        OpenAIGPTConfig,
        OpenAIGPTLMHeadModel,
    )

    act = _ACT_TO_HF[hf_type].get(c.act)
    if act is None:
        # HF's OpenAIGPT has no exact-erf GELU ("gelu" there is the tanh approximation): refuse rather
        # than export a model whose logits differ from the bundle's by ~1e-3.
        raise ConversionError(f"activation {c.act!r} has no {hf_type} equivalent; supported: "
                              f"{', '.join(_ACT_TO_HF[hf_type])} (openai-gpt's afn 'gelu' is chatforge's gelu_tanh)")
    vocab = b.model.lm_head.weight.size(0)
    s = b.tokenizer.special
    common = dict(vocab_size=vocab, n_positions=c.n_positions, n_embd=c.d_model, n_layer=c.n_layers,
                  n_head=c.n_heads, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.attn_dropout,
                  layer_norm_epsilon=c.layer_norm_epsilon, initializer_range=c.init_std,
                  tie_word_embeddings=c.tie_embeddings, bos_token_id=s.bos, eos_token_id=s.eos, pad_token_id=s.pad)
    if hf_type == "gpt2":
        hf_cfg = GPT2Config(activation_function=act, n_inner=c.ff_dim, **common)
        hf_model = GPT2LMHeadModel(hf_cfg)
    else:
        if c.ff_dim != 4 * c.d_model:
            raise ConversionError(f"openai-gpt requires d_ff = 4*d_model; this model has d_ff={c.ff_dim}")
        hf_cfg = OpenAIGPTConfig(afn=act, **common)
        hf_model = OpenAIGPTLMHeadModel(hf_cfg)
    sd = state_dict_to_hf(b.model.state_dict(), hf_type, c.n_layers)
    missing, unexpected = hf_model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (c.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(f"HF model does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        hf_model.eval().save_pretrained(str(tmp))
        _write_tokenizer(b.tokenizer, tmp)
    return out_dir


def _write_tokenizer(tok, out: Path) -> None:
    if tok.kind == "hf_tokenizers":
        from transformers import PreTrainedTokenizerFast  # hf extra only: transformers is not installed

        strings = {k: v for k, v in tok.token_strings().items() if v is not None}
        fast = PreTrainedTokenizerFast(tokenizer_object=tok.tk, **strings)
        fast.save_pretrained(str(out))
    else:
        # A SentencePiece model: HF loads it with a SentencePiece-based tokenizer class.
        (out / tok.filename).write_bytes(tok.to_bytes())
        logger.warning("the bundle's SentencePiece tokenizer was copied as %s; load it in HF with a "
                       "SentencePiece tokenizer class (e.g. LlamaTokenizer)", tok.filename)
