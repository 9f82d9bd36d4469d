"""Hugging Face BERT checkpoints <-> chatforge ``bert`` bundles (optional extra ``chatforge[hf]``).

``from_hf`` reads a checkpoint folder (``config.json`` + the weights: one file or shards, safetensors or
``pytorch_model.bin``, :mod:`chatforge.interop.hf_weights`) of ``BertModel``,
``BertForPreTraining``/``BertForMaskedLM`` (-> task ``mlm_nsp``; missing heads are freshly
initialised and logged: ``BertForMaskedLM`` saves neither the NSP head nor the pooler, which only
the NSP head and sentence classification read), ``BertForSequenceClassification`` (-> ``classification``, labels from
``id2label``) or ``BertForTokenClassification`` (-> ``token_classification``). The checkpoint's
own tokenizer is kept: its ``tokenizer.json``, or one built from a WordPiece ``vocab.txt``.

``to_hf`` writes the matching HF class with ``save_pretrained`` (safetensors) plus the tokenizer.
Parameter names map one to one (:func:`hf_key_map`); nothing is approximated.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from chatforge.bundle import build_from_config, load_bundle, save_bundle
from chatforge.config import validate_config
from chatforge.fileio import atomic_dir
from chatforge.interop import ConversionError, read_hf_config
from chatforge.interop.hf_tokenizer import HFTokenizer
from chatforge.interop.hf_weights import read_hf_weights

logger = logging.getLogger(__name__)

_BACKBONE_LAYER = {
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense",
    "norm1": "attention.output.LayerNorm",
    "ff.linear1": "intermediate.dense",
    "ff.linear2": "output.dense",
    "norm2": "output.LayerNorm",
}
_HEADS = {
    "mlm_nsp": {"mlm_transform": "cls.predictions.transform.dense",
                "mlm_norm": "cls.predictions.transform.LayerNorm",
                "nsp_head": "cls.seq_relationship"},
    "mlm": {"mlm_transform": "cls.predictions.transform.dense",
            "mlm_norm": "cls.predictions.transform.LayerNorm",
            "nsp_head": "cls.seq_relationship"},
    "classification": {"classifier": "classifier"},
    "pair_classification": {"classifier": "classifier"},
    "token_classification": {"classifier": "classifier"},
}
_HF_CLASS = {"mlm_nsp": "BertForPreTraining", "mlm": "BertForPreTraining", "classification": "BertForSequenceClassification",
             "pair_classification": "BertForSequenceClassification",
             "token_classification": "BertForTokenClassification"}


class HFBertError(ValueError):
    pass


def hf_key_map(num_layers: int, task: str, pooler: bool = True) -> dict[str, str]:
    """chatforge parameter name -> HF name (backbone prefixed ``bert.``, as in every HF task model)."""
    m = {
        "bert.embeddings.word.embedding.weight": "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position.embedding.weight": "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type.weight": "bert.embeddings.token_type_embeddings.weight",
    }
    for p in ("weight", "bias"):
        m[f"bert.embeddings.norm.{p}"] = f"bert.embeddings.LayerNorm.{p}"
        for i in range(num_layers):
            for mine, theirs in _BACKBONE_LAYER.items():
                m[f"bert.layers.{i}.{mine}.{p}"] = f"bert.encoder.layer.{i}.{theirs}.{p}"
        if pooler:
            m[f"bert.pooler.{p}"] = f"bert.pooler.dense.{p}"
        for mine, theirs in _HEADS[task].items():
            m[f"{mine}.{p}"] = f"{theirs}.{p}"
    if task in ("mlm_nsp", "mlm"):
        m["mlm_bias"] = "cls.predictions.bias"
    return m


# ------------------------------------------------------------------------------------------ reading


def read_hf_state_dict(src: Path) -> dict[str, Tensor]:
    """Load a checkpoint folder's tensors without executing code; keys normalised to ``bert.``-prefixed
    names with ``weight``/``bias`` (very old checkpoints use LayerNorm ``gamma``/``beta``)."""
    try:
        sd = read_hf_weights(src)
    except ConversionError as e:
        raise HFBertError(str(e)) from None
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k))
        if k.startswith(("embeddings.", "encoder.", "pooler.")):
            k = "bert." + k  # a bare BertModel
        out[k] = v
    return out


def _task_for(hf_cfg: dict) -> str:
    arch = (hf_cfg.get("architectures") or ["BertModel"])[0]
    if arch == "BertForSequenceClassification":
        return "classification"
    if arch == "BertForTokenClassification":
        return "token_classification"
    if arch in ("BertModel", "BertForPreTraining", "BertForMaskedLM", "BertLMHeadModel"):
        return "mlm_nsp"
    raise HFBertError(f"architecture {arch!r} is not supported; supported: BertModel, BertForPreTraining, "
                      "BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification")


def bert_params_from_hf(hf_cfg: dict) -> dict:
    """HF ``config.json`` -> chatforge ``model:`` keys of family ``bert``; unsupported variants fail."""
    act = hf_cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise HFBertError(f"hidden_act={act!r} is not supported; chatforge BERT uses exact 'gelu'")
    pos = hf_cfg.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise HFBertError(f"position_embedding_type={pos!r} is not supported; allowed: 'absolute'")
    if hf_cfg.get("is_decoder") or hf_cfg.get("add_cross_attention"):
        raise HFBertError("decoder BERT variants (is_decoder / add_cross_attention) are not supported")
    return {
        "d_model": hf_cfg["hidden_size"], "n_heads": hf_cfg["num_attention_heads"],
        "num_layers": hf_cfg["num_hidden_layers"], "d_ff": hf_cfg["intermediate_size"],
        "dropout": hf_cfg.get("hidden_dropout_prob", 0.1), "max_len": hf_cfg["max_position_embeddings"],
        "type_vocab_size": hf_cfg.get("type_vocab_size", 2), "layer_norm_eps": hf_cfg.get("layer_norm_eps", 1e-12),
        "initializer_range": hf_cfg.get("initializer_range", 0.02), "vocab_size": hf_cfg["vocab_size"],
    }


def _labels_from(hf_cfg: dict) -> list[str]:
    id2label = hf_cfg.get("id2label") or {}
    n = hf_cfg.get("num_labels", len(id2label) or 2)
    if hf_cfg.get("problem_type") == "regression" or n < 2:
        raise HFBertError("regression heads (num_labels=1 / problem_type=regression) are not supported; "
                          "chatforge classifiers need >= 2 labels")
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


def _load_tokenizer(src: Path, tmp: Path, special_tokens: dict[str, str] | None = None):
    """The checkpoint's tokenizer as a chatforge HFTokenizer (tokenizer.json, or built from vocab.txt)."""
    if (src / "tokenizer.json").is_file():
        return HFTokenizer.load(src / "tokenizer.json", special_tokens=special_tokens)
    if (src / "vocab.txt").is_file():
        from tokenizers import (
            BertWordPieceTokenizer,  # hf extra only: not installed by chatforge[serve]/[train]
        )

        tc_path = src / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
        wp = BertWordPieceTokenizer(str(src / "vocab.txt"), lowercase=tc.get("do_lower_case", True),
                                    strip_accents=tc.get("strip_accents"))
        wp.save(str(tmp / "tokenizer.json"))
        return HFTokenizer.load(tmp / "tokenizer.json", special_tokens=special_tokens)
    raise HFBertError(f"{src} has no tokenizer: expected tokenizer.json or vocab.txt. Copy the checkpoint's "
                      f"tokenizer files into the folder (e.g. tokenizer.save_pretrained('{src}') in transformers)")


def from_hf(src_dir: Path, out_bundle: Path, *, task: str | None = None, bos_token: str | None = None,
            eos_token: str | None = None) -> Path:
    """Convert a HF BERT checkpoint folder into a chatforge bundle; returns the bundle path.

    ``bos_token``/``eos_token`` name the sequence delimiters if the vocabulary has no [CLS]/[SEP]."""
    src, out = Path(src_dir), Path(out_bundle)
    hf_cfg = read_hf_config(src, ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                                  "max_position_embeddings", "vocab_size"))
    if hf_cfg.get("model_type") != "bert":
        raise HFBertError(f"{src / 'config.json'} has model_type={hf_cfg.get('model_type')!r}; expected 'bert'")
    arch_task = _task_for(hf_cfg)
    if task is not None and task != arch_task:
        arch = (hf_cfg.get("architectures") or ["BertModel"])[0]
        raise HFBertError(f"task={task!r}: a BERT checkpoint's task follows its architecture ({arch} converts to "
                          f"{arch_task!r}); leave --task out, or convert a checkpoint of the architecture you need")
    task = arch_task
    labels = _labels_from(hf_cfg) if task != "mlm_nsp" else None
    params = bert_params_from_hf(hf_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        chosen = {k: v for k, v in (("bos", bos_token), ("eos", eos_token)) if v is not None}
        tok = _load_tokenizer(src, Path(tmp), chosen)
    if tok.vocab_size > params["vocab_size"]:
        raise HFBertError(f"tokenizer has {tok.vocab_size} tokens but the model's embedding has only "
                          f"{params['vocab_size']} rows")
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", src.resolve().name).lstrip("-_.") or "hf-bert"
    cfg = validate_config({
        "name": name,
        "data": {"path": str(src)},  # unknown for an imported checkpoint; records where it came from
        "tokenizer": {"vocab_size": max(16, tok.vocab_size)},
        "model": {"family": "bert", "task": task, **params},
        "train": {"max_source_len": params["max_len"], "max_target_len": params["max_len"]},
    }, source=str(src / "config.json"))
    model = build_from_config(cfg, tok, labels)
    theirs = read_hf_state_dict(src)
    mapping = hf_key_map(params["num_layers"], task, pooler=getattr(model.bert, "pooler", None) is not None)
    mine = model.state_dict()
    loaded, new = {}, []
    for k, hf_k in mapping.items():
        if hf_k in theirs:
            if theirs[hf_k].shape != mine[k].shape:
                raise HFBertError(f"{hf_k}: shape {tuple(theirs[hf_k].shape)} in the checkpoint, "
                                  f"{tuple(mine[k].shape)} expected from config.json")
            loaded[k] = theirs[hf_k].to(mine[k].dtype)
        else:
            new.append(k)
    pooler_new = [k for k in new if k.startswith("bert.pooler.")]
    backbone_new = [k for k in new if k.startswith("bert.") and k not in pooler_new]
    if backbone_new:
        raise HFBertError(f"{src} is missing backbone weights: {[mapping[k] for k in backbone_new][:5]}")
    if pooler_new:
        # BertForMaskedLM (and BertModel(add_pooling_layer=False)) save no pooler; only the NSP head and
        # sentence classification read it, so it starts untrained like any other new head.
        logger.warning("from-hf %s: the checkpoint has no pooler (%s), as BertForMaskedLM saves none; freshly "
                       "initialised: the pooled output and NSP head are untrained until fine-tuned",
                       src, ", ".join(mapping[k] for k in pooler_new))
    model.load_state_dict(loaded, strict=False)
    # chatforge's masked-LM head is tied to the word embeddings; HF's decoder matrix is the same tensor unless the
    # checkpoint was trained with tie_word_embeddings: false, and then it is dropped like any unused tensor.
    decoder, words = theirs.get("cls.predictions.decoder.weight"), theirs.get("bert.embeddings.word_embeddings.weight")
    untied = decoder is not None and words is not None and not torch.equal(decoder, words)
    if untied:
        logger.warning("from-hf %s: the checkpoint's masked-LM decoder (cls.predictions.decoder.weight) is not tied to "
                       "its word embeddings; chatforge's BERT ties them, so the bundle's masked-LM predictions differ "
                       "from the checkpoint's (the encoder and other heads are exact)", src)
    used = set(mapping.values()) | {"cls.predictions.decoder.bias"} | (
        set() if untied else {"cls.predictions.decoder.weight"})
    dropped = sorted(k for k in theirs if k not in used and not k.endswith("position_ids"))
    if new:
        logger.warning("from-hf %s: %d tensor(s) not in the checkpoint, freshly initialised: %s",
                       src, len(new), ", ".join(new))
    if dropped:
        logger.warning("from-hf %s: %d checkpoint tensor(s) dropped: %s", src, len(dropped), ", ".join(dropped[:10]))
    return save_bundle(out, model=model.eval(), tokenizer=tok, config=cfg, labels=labels,
                       extra_metadata={"converted_from": {"format": "hf", "path": str(src),
                                                          "architecture": (hf_cfg.get("architectures") or
                                                                           ["BertModel"])[0],
                                                          "new": new, "dropped": dropped}})


# ------------------------------------------------------------------------------------------ writing


def hf_state_dict(model, task: str) -> dict[str, Tensor]:
    """A chatforge BERT task model's weights under HF names (tied MLM decoder included)."""
    pooler = model.bert.pooler is not None
    mapping = hf_key_map(len(model.bert.layers), task, pooler=pooler)
    sd = model.state_dict()
    out = {hf_k: sd[k] for k, hf_k in mapping.items()}
    if task in ("mlm_nsp", "mlm"):
        out["cls.predictions.decoder.weight"] = sd["bert.embeddings.word.embedding.weight"]
        out["cls.predictions.decoder.bias"] = sd["mlm_bias"]
    return out


def to_hf(bundle_dir: Path, out_dir: Path) -> Path:
    """Export a ``bert`` bundle as the matching HF model folder (safetensors + tokenizer)."""
    import transformers  # hf extra only: not installed by chatforge[serve]/[train]

    bundle = load_bundle(bundle_dir)
    if bundle.family != "bert":
        raise HFBertError(f"{bundle_dir} holds family {bundle.family!r}; hf_bert exports only 'bert'")
    task, model, tok = bundle.task, bundle.model, bundle.tokenizer
    p = bundle.config.model.family_config()
    vocab_rows = model.bert.embeddings.word.weight.size(0)
    kw = {}
    if bundle.labels:
        kw = {"id2label": dict(enumerate(bundle.labels)),
              "label2id": {lab: i for i, lab in enumerate(bundle.labels)}}
    hf_cfg = transformers.BertConfig(
        vocab_size=vocab_rows, hidden_size=p.d_model, num_hidden_layers=p.num_layers,
        num_attention_heads=p.n_heads, intermediate_size=p.d_ff, hidden_act="gelu",
        hidden_dropout_prob=p.dropout, attention_probs_dropout_prob=p.dropout,
        max_position_embeddings=p.max_len, type_vocab_size=p.type_vocab_size,
        layer_norm_eps=p.layer_norm_eps, initializer_range=p.initializer_range,
        pad_token_id=tok.special.pad, architectures=[_HF_CLASS[task]], **kw,
    )
    hf_model = getattr(transformers, _HF_CLASS[task])(hf_cfg)
    hf_model.load_state_dict(hf_state_dict(model, task), strict=True)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        hf_model.eval().save_pretrained(tmp, safe_serialization=True)
        (tmp / tok.filename).write_bytes(tok.to_bytes())
        if tok.kind == "hf_tokenizers":
            s = tok.special
            names = {"pad_token": s.pad, "unk_token": s.unk, "cls_token": s.cls, "sep_token": s.sep,
                     "mask_token": s.mask}
            tc = {k: tok.id_to_piece(v) for k, v in names.items() if v is not None}
            tc["tokenizer_class"] = "PreTrainedTokenizerFast"
            (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
        else:
            logger.warning("%s carries a SentencePiece tokenizer (%s); HF's BertTokenizer cannot read it, "
                           "load it with sentencepiece", bundle_dir, tok.filename)
    return out
