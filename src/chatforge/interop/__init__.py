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


def _read_json(path: Path) -> dict:
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(tree, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(tree).__name__}")
    return tree


# HF model_type -> its transformers config class, whose defaults fill the keys a config.json leaves out
_HF_CONFIG_CLASS = {"bert": "BertConfig", "openai-gpt": "OpenAIGPTConfig", "gpt2": "GPT2Config"}


def read_hf_config(src: Path, required: tuple[str, ...] = ()) -> dict:
    """``src/config.json`` with the keys it leaves out filled as transformers fills them (its config class's
    defaults: a hand-written ``{"model_type": "gpt2", "n_layer": 2, ...}`` loads in HF, so it converts here). Without
    transformers, a ``required`` key that is absent is named."""
    path = src / "config.json"
    tree = _read_json(path)
    cls_name = _HF_CONFIG_CLASS.get(tree.get("model_type"))
    if cls_name:
        try:
            import transformers  # hf extra only: a tokenizer.json checkpoint converts with tokenizers alone

            tree = {**getattr(transformers, cls_name).from_dict(tree).to_dict(), **tree}
        except ImportError:
            pass
        except Exception:  # noqa: BLE001 - values transformers refuses: the checks below and the converter name them
            pass
    missing = [k for k in required if tree.get(k) is None]
    if missing:
        raise ConversionError(f"{path} has no {', '.join(missing)} (install transformers, pip install "
                              f"'chatforge[hf]', to use its defaults, or add them)")
    return tree


def _check_out(src: Path, out: Path, ours: str) -> None:
    """The output folder is replaced whole (``atomic_dir``): refuse one that holds the source, or a folder of other
    files; an earlier output of the same kind (a folder holding ``ours``, no chatforge ``metadata.json`` beside an
    HF ``config.json``) or an empty folder is replaced as before."""
    s, o = src.resolve(), out.resolve()
    if o == s or o in s.parents:
        raise ConversionError(f"output {out} holds the source {src}, and the output replaces its folder whole; "
                              f"give a new folder")
    if o.exists() and not o.is_dir():
        raise ConversionError(f"output {out} is a file; give a new folder")
    if o.is_dir() and any(o.iterdir()):
        earlier = (o / ours).is_file() and not (ours == "config.json" and (o / "metadata.json").is_file())
        if not earlier:
            names = sorted(p.name for p in o.iterdir())
            raise ConversionError(f"output {out} already holds other files ({', '.join(names[:4])}"
                                  f"{', ...' if len(names) > 4 else ''}), which the output would replace whole; "
                                  f"give a new or empty folder")


def from_hf(src_dir: str | Path, out_bundle: str | Path, **kwargs) -> Path:
    src = Path(src_dir)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{src} is not a Hugging Face checkpoint folder: no config.json")
    model_type = _read_json(cfg_path).get("model_type")
    if model_type not in _FROM_HF:
        raise ConversionError(
            f"model_type {model_type!r} in {cfg_path} is not supported; supported: {', '.join(sorted(_FROM_HF))}"
        )
    _check_out(src, Path(out_bundle), "metadata.json")
    return _module(_FROM_HF[model_type]).from_hf(src, Path(out_bundle), **kwargs)


def to_hf(bundle_dir: str | Path, out_dir: str | Path, **kwargs) -> Path:
    meta_path = Path(bundle_dir) / "metadata.json"
    if not meta_path.is_file():
        raise ConversionError(f"{bundle_dir} is not a chatforge bundle: no metadata.json")
    family = _read_json(meta_path).get("family")
    if family not in _TO_HF:
        raise ConversionError(f"family {family!r} cannot be exported to HF; supported: {', '.join(sorted(_TO_HF))}")
    _check_out(Path(bundle_dir), Path(out_dir), "config.json")
    return _module(_TO_HF[family]).to_hf(Path(bundle_dir), Path(out_dir), **kwargs)
