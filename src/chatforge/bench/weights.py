"""The identical weights every engine of a case runs: random models built from a chatforge config, saved
as bundles, exported with ``to-hf`` (chatforge.interop) and converted by each anchor's own tool.

* GPT-2: bundle -> ``to_hf`` (``GPT2LMHeadModel``) -> CTranslate2's ``TransformersConverter`` (float32
  and int8 copies).
* BERT classifier: bundle -> ``to_hf`` (``BertForSequenceClassification``) -> ``torch.onnx.export`` of
  that HF model -> ONNX Runtime's ``quantize_dynamic`` (int8 weights) copy.
* Transformer encoder-decoder: bundle -> ``to_hf`` (``MarianMTModel``) -> CTranslate2 float32 and int8
  copies, converted by CTranslate2's own Transformers loader for Marian/BART
  (:func:`chatforge.interop.hf_transformer.to_ct2`, through :func:`ct2_marian`).
* Transformer encoder classifier: no Hugging Face class has its head (Marian has none), so the chatforge
  model itself is exported with ``torch.onnx.export`` (as ``chatforge serve --backend onnxruntime`` does)
  -> ONNX Runtime's ``quantize_dynamic`` copy.

The bundles' tokenizer is a word-level Hugging Face tokenizer of the wanted vocabulary size (the
benchmarks feed token ids, so only the size matters, and it exports and converts as it is).
"""

from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]", "[MASK]")


class AnchorMissing(RuntimeError):
    """An anchor library is not installed: the engines (or the case) that need it are reported skipped."""


def need(module: str) -> ModuleType:
    """Import an anchor's module, or raise :class:`AnchorMissing` naming it and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise AnchorMissing(f"{module} is not installed ({e}); pip install 'chatforge[bench]'") from None


def _quiet_transformers() -> None:
    # Its per-load progress bars would run through the CLI's progress display.
    need("transformers").utils.logging.disable_progress_bar()


def word_tokenizer(path: Path, vocab_size: int):
    """A word-level ``tokenizer.json`` with chatforge's special tokens then fillers, as an HFTokenizer."""
    tokenizers = need("tokenizers")
    from chatforge.interop.hf_tokenizer import HFTokenizer

    words = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS)))]
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    tk.save(str(path))
    return HFTokenizer.load(path)


def _bundle(out: Path, tok, model_cfg: dict, labels: list[str] | None, seed: int) -> Path:
    from chatforge.bundle import build_from_config, save_bundle
    from chatforge.config import validate_config

    cfg = validate_config({"name": out.name, "data": {"path": "bench"}, "model": model_cfg,
                           "tracking": {"enabled": False}}, source="chatforge bench")
    torch.manual_seed(seed)
    model = build_from_config(cfg, tok, labels).eval()
    return save_bundle(out, model=model, tokenizer=tok, config=cfg, labels=labels)


@dataclass
class GenerationWeights:
    """A generator bundle with its HF export and CTranslate2 copies (GPT-2 or the Transformer encoder-decoder)."""

    bundle: Path
    hf: Path | None = None
    ct2: dict[str, Path] | None = None  # CTranslate2 quantization -> model folder
    vocab: list[str] | None = None  # CTranslate2 takes token strings


GPTWeights = Seq2SeqWeights = GenerationWeights


def gpt_weights(work: Path, *, vocab: int, layers: int, d_model: int, heads: int, positions: int,
                init_std: float, ct2_quantizations: tuple[str, ...] = ("float32", "int8")) -> GPTWeights:
    """The GPT-2 bundle and, where the anchors are installed, its HF export and CTranslate2 copies.
    Raises AnchorMissing when transformers is missing (nothing to export through)."""
    _quiet_transformers()
    from chatforge.interop import to_hf

    tok = word_tokenizer(work / "gpt-tokenizer.json", vocab)
    model_cfg = {"family": "gpt", "task": "lm", "variant": "gpt2", "d_model": d_model, "n_heads": heads,
                 "n_layers": layers, "n_positions": positions, "dropout": 0.0, "attn_dropout": 0.0,
                 "init_std": init_std}
    w = GPTWeights(bundle=_bundle(work / "gpt-bundle", tok, model_cfg, None, seed=0))
    w.hf = to_hf(w.bundle, work / "gpt-hf")
    try:
        need("ctranslate2")
        from ctranslate2.converters import TransformersConverter
    except AnchorMissing as e:
        logger.warning("CTranslate2 engines skipped: %s", e)
        return w
    w.ct2 = {}
    for q in ct2_quantizations:
        w.ct2[q] = Path(TransformersConverter(str(w.hf)).convert(str(work / f"gpt-ct2-{q}"), quantization=q,
                                                                  force=True))
    w.vocab = [tok.tk.id_to_token(i) for i in range(tok.vocab_size)]
    return w


@dataclass
class BertWeights:
    bundle: Path
    hf: Path
    onnx: dict[str, Path] | None = None  # "fp32" / "int8" -> .onnx file


def bert_weights(work: Path, *, vocab: int, layers: int, d_model: int, heads: int, max_len: int,
                 labels: list[str], init_std: float) -> BertWeights:
    """The BERT classifier bundle, its HF export and the ONNX fp32 / dynamic-int8 files made from that."""
    _quiet_transformers()
    from chatforge.interop import to_hf

    tok = word_tokenizer(work / "bert-tokenizer.json", vocab)
    model_cfg = {"family": "bert", "task": "classification", "d_model": d_model, "n_heads": heads,
                 "num_layers": layers, "d_ff": 4 * d_model, "dropout": 0.0, "max_len": max_len,
                 "initializer_range": init_std}
    bundle = _bundle(work / "bert-bundle", tok, model_cfg, labels, seed=1)
    w = BertWeights(bundle=bundle, hf=to_hf(bundle, work / "bert-hf"))
    need("onnxruntime")
    need("onnx")
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(str(w.hf)).eval()
    w.onnx = _onnx_pair(hf, ["input_ids", "attention_mask", "token_type_ids"], work / "bert")
    return w


@dataclass
class ClassifierWeights:
    bundle: Path
    onnx: dict[str, Path]  # "fp32" / "int8" -> .onnx file


class _Logits(torch.nn.Module):
    """A chatforge classifier with its logits as the one output (what the exporter traces)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits


def transformer_classifier_weights(work: Path, *, vocab: int, layers: int, d_model: int, heads: int, d_ff: int,
                                   max_len: int, labels: list[str]) -> ClassifierWeights:
    """The Transformer encoder classifier bundle (post-LN, mean pooling) and the ONNX fp32 / dynamic-int8
    files exported from that chatforge model itself."""
    need("onnxruntime")
    need("onnx")
    tok = word_tokenizer(work / "tcls-tokenizer.json", vocab)
    model_cfg = {"family": "transformer", "task": "classification", "d_model": d_model, "n_heads": heads,
                 "num_encoder_layers": layers, "d_ff": d_ff, "dropout": 0.0, "max_len": max_len}
    bundle = _bundle(work / "tcls-bundle", tok, model_cfg, labels, seed=3)
    from chatforge.bundle import load_bundle

    model = load_bundle(bundle).model.eval()
    return ClassifierWeights(bundle=bundle, onnx=_onnx_pair(_Logits(model), ["input_ids"], work / "tcls"))


def _onnx_pair(model: torch.nn.Module, names: list[str], stem: Path) -> dict[str, Path]:
    """``model`` exported to ONNX (dynamic batch and length) and ONNX Runtime's dynamic int8 copy of it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    example = tuple(torch.ones(2, 8, dtype=torch.long) for _ in names)
    fp32, int8 = stem.with_name(f"{stem.name}.onnx"), stem.with_name(f"{stem.name}-int8.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns that it is deprecated and about traced shape arithmetic; the
        # dynamic axes below cover what the tracer sees.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(fp32), input_names=names, output_names=["logits"],
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    # quantize_dynamic logs a line per tensor on the root logger at INFO, and a WARNING advising its
    # shape-inference pre-processing (which matters for static quantization, not for dynamic int8 weights).
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    return {"fp32": fp32, "int8": int8}


def transformer_weights(work: Path, *, vocab: int, layers: int, d_model: int, heads: int, d_ff: int,
                        max_len: int, ct2_quantizations: tuple[str, ...] = ("float32", "int8")) -> Seq2SeqWeights:
    """The Transformer encoder-decoder bundle (post-LN, tied embeddings, relu: the paper's model, chatforge's
    defaults), its ``MarianMTModel`` export and, where CTranslate2 is installed, its CTranslate2 copies.
    Raises AnchorMissing when transformers is missing (nothing to export through)."""
    _quiet_transformers()
    from chatforge.interop import to_hf

    tok = word_tokenizer(work / "s2s-tokenizer.json", vocab)
    model_cfg = {"family": "transformer", "task": "generation", "d_model": d_model, "n_heads": heads,
                 "num_encoder_layers": layers, "num_decoder_layers": layers, "d_ff": d_ff, "dropout": 0.0,
                 "max_len": max_len}
    w = Seq2SeqWeights(bundle=_bundle(work / "s2s-bundle", tok, model_cfg, None, seed=2))
    w.hf = to_hf(w.bundle, work / "s2s-hf")
    try:
        need("ctranslate2")
    except AnchorMissing as e:
        logger.warning("CTranslate2 engines skipped: %s", e)
        return w
    w.ct2 = {q: ct2_marian(w.hf, work / f"s2s-ct2-{q}", q) for q in ct2_quantizations}
    w.vocab = [tok.tk.id_to_token(i) for i in range(tok.vocab_size)]
    return w


def ct2_marian(hf_dir: Path, out: Path, quantization: str) -> Path:
    """:func:`chatforge.interop.hf_transformer.to_ct2` (the Marian export -> a CTranslate2 ``Translator``),
    with a missing ctranslate2 reported as :class:`AnchorMissing`."""
    need("ctranslate2")
    from chatforge.interop.hf_transformer import to_ct2

    return to_ct2(hf_dir, out, quantization)
