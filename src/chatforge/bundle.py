"""A bundle: everything the server needs to serve a trained model, and nothing it must trust.

    weights.safetensors   tensors only (no pickle, so loading never executes code)
    tokenizer.model       the SentencePiece model the weights were trained with (or tokenizer.json,
                          a Hugging Face tokenizer, for converted checkpoints; byte_tokenizer.json, the
                          fixed byte-level vocabulary of tokenizer.kind byte: metadata says which)
    config.yaml           the resolved experiment config: how the model was made
    labels.json           class labels, for classifiers
    metadata.json         chatforge version, family, task, data/tokenizer hashes, metrics, created time
    drafts/               generation bundles: the training replies' token ids (chatforge.drafts), the
                          datastore of speculative decoding when served

Estimator bundles (families registered with kind != "torch": xgboost, linear, ensemble) hold the
estimator's own JSON / safetensors files instead of weights.safetensors + tokenizer.model, and
metadata records ``"kind": "estimator"``; loading builds the family and calls its ``load`` (never
unpickles). An oos-binary detector lives in ``oos_detector/`` (see chatforge.oos).

Bundles are written into a temporary folder beside the target and renamed into
place, so a reader never sees a half-written bundle.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model
from torch import nn

import chatforge
from chatforge.config import ExperimentConfig, validate_config
from chatforge.decoding import autocast_for
from chatforge.drafts import DRAFTS_DIR, DraftIndex, DraftIndexError
from chatforge.fileio import atomic_dir
from chatforge.oos import OOSPolicy
from chatforge.registry import (
    OPTIONAL_MODULES,
    BuildContext,
    SpecialIds,
    build_model,
    install_hint,
    missing_modules,
)
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
    tokenizer: Tokenizer | None  # None for estimator bundles
    model: Any
    labels: list[str] | None
    metadata: dict[str, Any] = field(default_factory=dict)
    # The out-of-scope policy stored with a classifier (metadata "oos"); the one place it is read, so
    # evaluation and serving apply the same policy (chatforge.oos).
    oos: OOSPolicy = field(default_factory=OOSPolicy)
    # Training replies of a generation bundle (folder drafts/), the datastore of speculative decoding.
    drafts: DraftIndex | None = None

    @property
    def family(self) -> str:
        return self.config.model.family

    @property
    def task(self) -> str:
        return self.config.model.task

    @property
    def is_estimator(self) -> bool:
        return self.metadata.get("kind") == "estimator"

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(N, C) class probabilities of a classification bundle, columns in ``labels`` order."""
        if self.is_estimator:
            return self.model.predict_proba(list(texts))
        return torch_class_probs(self.model, self.tokenizer, list(texts), self.config.train.max_source_len)


def torch_class_probs(model, tok, texts: list[str], max_input_tokens: int, batch_size: int = 64) -> np.ndarray:
    """(N, C) softmax probabilities of a torch classifier, computed in batches (numpy float32)."""
    out = []
    for i in range(0, len(texts), batch_size):
        batch = class_inputs(model, tok, texts[i : i + batch_size], max_input_tokens)
        with torch.inference_mode(), autocast_for(model):
            out.append(model(**batch).logits.float().softmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def class_inputs(model, tok, texts: list[str], max_input_tokens: int) -> dict[str, torch.Tensor]:
    """A torch classifier's forward kwargs for ``texts`` (one batch); also what the ONNX Runtime backend
    feeds its export of the same model (serving.backend_ort), so both read identical inputs."""
    seqs = [ids[:max_input_tokens] or [tok.unk_id] for ids in tok.encode_batch(texts)]
    if hasattr(model, "prepare_inputs"):
        # Families with their own input layout (BERT: [CLS] text [SEP] + segment ids) build it.
        return model.prepare_inputs(seqs)
    L = max(len(s) for s in seqs)
    x = torch.full((len(seqs), L), tok.pad_id, dtype=torch.long)
    for j, s in enumerate(seqs):
        x[j, : len(s)] = torch.tensor(s)
    return {"input_ids": x}


def load_member_classifier(path: Path) -> Bundle:
    """A classification bundle as an ensemble member (``BuildContext.load_classifier``)."""
    bundle = load_bundle(path)
    if bundle.task != "classification":
        raise BundleError(f"ensemble member {path} has task {bundle.task!r}; only classification bundles combine")
    return bundle


def build_context(cfg: ExperimentConfig, tokenizer: Tokenizer | None, labels: list[str] | None) -> BuildContext:
    """What the family's builder gets besides its typed config (the same for training and loading)."""
    return BuildContext(
        task=cfg.model.task, vocab_size=tokenizer.vocab_size if tokenizer is not None else 0,
        special=tokenizer.special if tokenizer is not None else SpecialIds(),
        num_labels=len(labels) if labels else None, tokenizer=tokenizer,
        load_classifier=load_member_classifier,
    )


def build_from_config(cfg: ExperimentConfig, tokenizer: Tokenizer | None, labels: list[str] | None):
    return build_model(cfg.model.family, cfg.model.family_config(), build_context(cfg, tokenizer, labels))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_bundle(
    out_dir: str | Path,
    *,
    model: nn.Module | Any,
    tokenizer: Tokenizer | None,
    config: ExperimentConfig,
    labels: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    data_sha256: str | None = None,
    extra_metadata: dict[str, Any] | None = None,
    extra_dirs: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle atomically. ``model`` is an ``nn.Module`` (weights.safetensors + tokenizer) or an
    estimator with ``save(dir)`` (its own files, no tokenizer); ``extra_dirs`` maps a subfolder name to
    an object whose ``save(dir)`` fills it (the oos-binary detector)."""
    out = Path(out_dir)
    is_torch = isinstance(model, nn.Module)
    with atomic_dir(out) as tmp:
        if is_torch:
            _st_save_model(model, str(tmp / WEIGHTS))  # handles tied (shared) tensors
        else:
            model.save(tmp)
        if tokenizer is not None:
            (tmp / tokenizer.filename).write_bytes(tokenizer.to_bytes())
        for sub, obj in (extra_dirs or {}).items():
            obj.save(tmp / sub)
        (tmp / CONFIG).write_text(config.to_yaml(), encoding="utf-8")
        if labels is not None:
            _write_json(tmp / LABELS, list(labels))
        meta = {
            "bundle_format": BUNDLE_FORMAT,
            "chatforge_version": chatforge.__version__,
            "name": config.name,
            "family": config.model.family,
            "task": config.model.task,
            "kind": "torch" if is_torch else "estimator",
            "tokenizer": None if tokenizer is None else {
                "kind": tokenizer.kind, "file": tokenizer.filename, "sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size,
                # special tokens chosen by name (HF vocabularies without conventional spellings)
                **({"special_tokens": tokenizer.special_tokens} if getattr(tokenizer, "special_tokens", None)
                   else {})},
            "data_sha256": data_sha256,
            "num_parameters": sum(p.numel() for p in model.parameters()) if is_torch else None,
            "metrics": metrics or {},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        meta.update(extra_metadata or {})
        _write_json(tmp / METADATA, meta)
    return out


def _permission_denied(bundle: Path, what: str | os.PathLike) -> BundleError:
    try:
        st = os.stat(what)
        mode = f" (mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid})"
    except OSError:
        mode = ""
    return BundleError(
        f"permission denied: cannot read {what}{mode}; this process runs as uid {os.geteuid()}. "
        f"Make the bundle readable by it, e.g. chmod -R a+rX {bundle}"
    )


def _check_readable(path: Path) -> None:
    """Open every file of the bundle once, so an unreadable one is reported as what it is.

    Without this a file in a folder we may not search looks missing (``is_file()`` is False),
    and readers fail later with errors that do not say "permission".
    """
    errors: list[OSError] = []
    for root, _dirs, files in os.walk(path, onerror=errors.append):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb"):
                    pass
            except PermissionError as e:
                errors.append(e)
    for e in errors:
        if isinstance(e, PermissionError):
            raise _permission_denied(path, e.filename or path)


def read_bundle_task(path: str | Path) -> str | None:
    """A bundle folder's task as its ``metadata.json`` records it, without loading anything else; None when the
    file is missing or unreadable (loading the bundle then says why)."""
    try:
        meta = json.loads((Path(path) / METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    task = meta.get("task") if isinstance(meta, dict) else None
    return task if isinstance(task, str) else None


def bundle_tokenizer(path: Path, metadata: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a torch bundle, as its ``metadata.json`` names it (file, kind, chosen special tokens)."""
    tok_meta = metadata.get("tokenizer") or {}
    tok_file = tok_meta.get("file", TOKENIZER)
    if not (path / tok_file).is_file():
        raise BundleError(f"{path} is not a complete chatforge bundle: missing {tok_file}")
    return load_tokenizer(path / tok_file, tok_meta.get("kind", "sentencepiece"),
                          special_tokens=tok_meta.get("special_tokens"))


def load_bundle(path: str | Path, *, device: str = "cpu") -> Bundle:
    """The bundle at ``path``, loaded. Raises :class:`BundleError` naming what is wrong: not a bundle, unreadable,
    incomplete, damaged, or needing packages this installation lacks (which extra to install)."""
    try:
        return _load_bundle(Path(path), device)
    except ModuleNotFoundError as e:  # e.g. an out-of-scope detector's scikit-learn under chatforge[serve] alone
        root = (e.name or "").split(".")[0]
        if root not in OPTIONAL_MODULES:
            raise
        raise BundleError(f"{path} needs {install_hint([root])}") from None


def _load_bundle(path: Path, device: str) -> Bundle:
    try:
        is_dir = path.is_dir()
    except PermissionError:  # a folder above it may not be searched
        raise _permission_denied(path, path) from None
    if not is_dir:
        raise BundleError(f"bundle not found: {path} is not a folder")
    _check_readable(path)
    metadata = json.loads((path / METADATA).read_text(encoding="utf-8")) if (path / METADATA).is_file() else {}
    if metadata.get("kind") == "estimator":
        return _load_estimator_bundle(path, metadata)
    tok_meta = metadata.get("tokenizer", {})
    tok_file = tok_meta.get("file", TOKENIZER)
    missing = [n for n in (WEIGHTS, tok_file, CONFIG, METADATA) if not (path / n).is_file()]
    if missing:
        hint = (f"; {path} looks like a run folder: its bundle is {path / 'bundle'}"
                if (path / "bundle" / METADATA).is_file() else "")
        raise BundleError(f"{path} is not a complete chatforge bundle: missing {', '.join(missing)}{hint}")
    tree = yaml.safe_load((path / CONFIG).read_text(encoding="utf-8"))
    cfg = validate_config(tree, source=str(path / CONFIG))
    tokenizer = bundle_tokenizer(path, metadata)
    labels = json.loads((path / LABELS).read_text(encoding="utf-8")) if (path / LABELS).is_file() else None
    if labels is None and cfg.model.task in ("classification", "pair_classification", "token_classification"):
        raise BundleError(f"{path} is not a complete chatforge bundle: missing {LABELS} (a {cfg.model.task} "
                          f"bundle names its classes there)")
    model = build_from_config(cfg, tokenizer, labels)
    try:
        missing_keys, unexpected = _st_load_model(model, str(path / WEIGHTS), strict=False, device=device)
    except SafetensorError as e:  # a copy or download cut short, or another file under the name
        raise BundleError(f"{path / WEIGHTS} is damaged or incomplete ({e}); copy or train the bundle again") from None
    except RuntimeError as e:  # load_state_dict's size mismatches: weights of another config
        first = str(e).strip().splitlines()
        raise BundleError(f"{path / WEIGHTS} does not match the model built from config.yaml: "
                          f"{' '.join(x.strip() for x in first[1:3]) or first[0]}") from None
    if missing_keys or unexpected:
        raise BundleError(
            f"{path / WEIGHTS} does not match the model built from config.yaml: "
            f"missing {sorted(missing_keys)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.eval()
    drafts = None
    if (path / DRAFTS_DIR).is_dir():
        try:
            drafts = DraftIndex.load(path / DRAFTS_DIR, vocab_size=tokenizer.vocab_size)
        except DraftIndexError as e:
            raise BundleError(str(e)) from None
    return Bundle(path=path, config=cfg, tokenizer=tokenizer, model=model, labels=labels, metadata=metadata,
                  oos=OOSPolicy.from_metadata(metadata.get("oos"), path), drafts=drafts)


def _load_estimator_bundle(path: Path, metadata: dict[str, Any]) -> Bundle:
    # A response selector (task selection) has a reply pool, not classes: no labels.json.
    needed = (CONFIG, METADATA) if metadata.get("task") == "selection" else (CONFIG, METADATA, LABELS)
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise BundleError(f"{path} is not a complete chatforge estimator bundle: missing {', '.join(missing)}")
    cfg = validate_config(yaml.safe_load((path / CONFIG).read_text(encoding="utf-8")), source=str(path / CONFIG))
    if cfg.model.spec.kind == "torch":
        raise BundleError(f"{path}: metadata says kind 'estimator' but family {cfg.model.family!r} is a torch family")
    # Checked before loading: estimators import these lazily, some only at their first request.
    missing = missing_modules(cfg.model.spec.required_modules(cfg.model.family_config()))
    if missing:
        raise BundleError(f"{path} is a {cfg.model.family} bundle (task {cfg.model.task}) and needs "
                          f"{install_hint(missing)}")
    if cfg.model.task == "selection":
        model = build_from_config(cfg, None, None).load(path)
        return Bundle(path=path, config=cfg, tokenizer=None, model=model, labels=None, metadata=metadata,
                      oos=OOSPolicy.from_metadata(None, path))
    labels = json.loads((path / LABELS).read_text(encoding="utf-8"))
    # The family's own loader reads JSON / safetensors only: nothing in the bundle is executed.
    model = build_from_config(cfg, None, labels).load(path)
    if list(model.labels) != list(labels):
        raise BundleError(f"{path}: the estimator's labels do not match {LABELS} "
                          f"({list(model.labels)[:5]}... vs {labels[:5]}...)")
    return Bundle(path=path, config=cfg, tokenizer=None, model=model, labels=labels, metadata=metadata,
                  oos=OOSPolicy.from_metadata(metadata.get("oos"), path))
