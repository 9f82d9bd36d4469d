"""A bundle: everything the server needs to serve a trained model, and nothing it must trust.

    weights.safetensors   tensors only (no pickle, so loading never executes code)
    tokenizer.model       the SentencePiece model the weights were trained with (or tokenizer.json,
                          a Hugging Face tokenizer, for converted checkpoints: metadata says which)
    config.yaml           the resolved experiment config: how the model was made
    labels.json           class labels, for classifiers
    metadata.json         chatforge version, family, task, data/tokenizer hashes, metrics, created time

Bundles are written into a temporary folder beside the target and renamed into
place, so a reader never sees a half-written bundle.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model
from torch import nn

import chatforge
from chatforge.config import ExperimentConfig, validate_config
from chatforge.registry import BuildContext, build_model
from chatforge.tokenizer import Tokenizer, load_tokenizer

WEIGHTS, TOKENIZER, CONFIG, LABELS, METADATA = (
    "weights.safetensors", "tokenizer.model", "config.yaml", "labels.json", "metadata.json",
)
BUNDLE_FORMAT = 1


class BundleError(ValueError):
    pass


@dataclass
class Bundle:
    path: Path
    config: ExperimentConfig
    tokenizer: Tokenizer
    model: Any
    labels: list[str] | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.config.model.family

    @property
    def task(self) -> str:
        return self.config.model.task


def build_from_config(cfg: ExperimentConfig, tokenizer: Tokenizer, labels: list[str] | None):
    ctx = BuildContext(
        task=cfg.model.task, vocab_size=tokenizer.vocab_size, special=tokenizer.special,
        num_labels=len(labels) if labels else None,
    )
    return build_model(cfg.model.family, cfg.model.family_config(), ctx)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_bundle(
    out_dir: str | Path,
    *,
    model: nn.Module,
    tokenizer: Tokenizer,
    config: ExperimentConfig,
    labels: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    data_sha256: str | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _st_save_model(model, str(tmp / WEIGHTS))  # handles tied (shared) tensors
        (tmp / tokenizer.filename).write_bytes(tokenizer.to_bytes())
        (tmp / CONFIG).write_text(config.to_yaml(), encoding="utf-8")
        if labels is not None:
            _write_json(tmp / LABELS, list(labels))
        meta = {
            "bundle_format": BUNDLE_FORMAT,
            "chatforge_version": chatforge.__version__,
            "name": config.name,
            "family": config.model.family,
            "task": config.model.task,
            "tokenizer": {"kind": tokenizer.kind, "file": tokenizer.filename, "sha256": tokenizer.sha256,
                          "vocab_size": tokenizer.vocab_size},
            "data_sha256": data_sha256,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "metrics": metrics or {},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        meta.update(extra_metadata or {})
        _write_json(tmp / METADATA, meta)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_bundle(path: str | Path, *, device: str = "cpu") -> Bundle:
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle not found: {path} is not a folder")
    metadata = json.loads((path / METADATA).read_text(encoding="utf-8")) if (path / METADATA).is_file() else {}
    tok_meta = metadata.get("tokenizer", {})
    tok_file = tok_meta.get("file", TOKENIZER)
    missing = [n for n in (WEIGHTS, tok_file, CONFIG, METADATA) if not (path / n).is_file()]
    if missing:
        raise BundleError(f"{path} is not a complete chatforge bundle: missing {', '.join(missing)}")
    tree = yaml.safe_load((path / CONFIG).read_text(encoding="utf-8"))
    cfg = validate_config(tree, source=str(path / CONFIG))
    tokenizer = load_tokenizer(path / tok_file, tok_meta.get("kind", "sentencepiece"))
    labels = json.loads((path / LABELS).read_text(encoding="utf-8")) if (path / LABELS).is_file() else None
    model = build_from_config(cfg, tokenizer, labels)
    missing_keys, unexpected = _st_load_model(model, str(path / WEIGHTS), strict=False, device=device)
    if missing_keys or unexpected:
        raise BundleError(
            f"{path / WEIGHTS} does not match the model built from config.yaml: "
            f"missing {sorted(missing_keys)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.eval()
    return Bundle(path=path, config=cfg, tokenizer=tokenizer, model=model, labels=labels, metadata=metadata)
