"""Interop with Hugging Face checkpoints (optional extra ``chatforge[hf]``).

``from_hf(src_dir, out_bundle)`` and ``to_hf(bundle_dir, out_dir)`` dispatch on the
checkpoint's ``config.json`` ``model_type`` (or the bundle's family) to one module per
family. Converted bundles keep the checkpoint's own tokenizer. The ``transformer`` family
exports only (to ``MarianMTModel``, :mod:`chatforge.interop.hf_transformer`).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# HF model_type -> chatforge module implementing from_hf/to_hf
_FROM_HF = {"bert": "chatforge.interop.hf_bert", "openai-gpt": "chatforge.interop.hf_gpt",
            "gpt2": "chatforge.interop.hf_gpt"}
# chatforge family -> module
_TO_HF = {"bert": "chatforge.interop.hf_bert", "gpt": "chatforge.interop.hf_gpt",
          "transformer": "chatforge.interop.hf_transformer"}  # to MarianMTModel


class ConversionError(ValueError):
    pass


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ConversionError(f"{e}. Install the extra: pip install 'chatforge[hf]'") from None


def from_hf(src_dir: str | Path, out_bundle: str | Path, **kwargs) -> Path:
    src = Path(src_dir)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{src} is not a Hugging Face checkpoint folder: no config.json")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    if model_type not in _FROM_HF:
        raise ConversionError(
            f"model_type {model_type!r} in {cfg_path} is not supported; supported: {', '.join(sorted(_FROM_HF))}"
        )
    return _module(_FROM_HF[model_type]).from_hf(src, Path(out_bundle), **kwargs)


def to_hf(bundle_dir: str | Path, out_dir: str | Path, **kwargs) -> Path:
    meta_path = Path(bundle_dir) / "metadata.json"
    if not meta_path.is_file():
        raise ConversionError(f"{bundle_dir} is not a chatforge bundle: no metadata.json")
    family = json.loads(meta_path.read_text()).get("family")
    if family not in _TO_HF:
        raise ConversionError(f"family {family!r} cannot be exported to HF; supported: {', '.join(sorted(_TO_HF))}")
    return _module(_TO_HF[family]).to_hf(Path(bundle_dir), Path(out_dir), **kwargs)
