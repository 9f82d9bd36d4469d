"""The run driver: one validated experiment config -> a run folder with a bundle.

runs/<run>/config.yaml      the resolved config (also inside the bundle)
runs/<run>/metrics.json     per-epoch history, best epoch, test metrics, sample replies
runs/<run>/bundle/          what `chatforge serve` loads
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from chatforge.bundle import build_from_config, load_bundle, save_bundle
from chatforge.config import ConfigError, ExperimentConfig
from chatforge.data import Example, read_examples, sample_corpus_path, split_examples
from chatforge.tokenizer import Tokenizer, atomic_write_bytes
from chatforge.training.tasks import TaskSpec, get_task, label_set, make_dataset
from chatforge.training.trainer import Callback, LoggingCallback, Trainer, resolve_device

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    bundle_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_data_path(path: str) -> Path:
    return sample_corpus_path() if path == "sample" else Path(path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_splits(cfg: ExperimentConfig) -> tuple[list[Example], list[Example], list[Example], Path]:
    d = cfg.data
    path = resolve_data_path(d.path)
    if not path.is_file():
        raise ConfigError(f"data.path: file not found: {path}")
    kw = dict(format=d.format, text_field=d.text_field, response_field=d.response_field,
              label_field=d.label_field, on_error=d.on_error)
    if d.split == "predefined":
        train, rep = read_examples(path, clinc_keys=tuple(d.train_keys), **kw)
        valid, _ = read_examples(path, clinc_keys=tuple(d.valid_keys), **kw)
        test: list[Example] = []
    else:
        examples, rep = read_examples(path, **kw)
        s = split_examples(examples, valid_fraction=d.valid_fraction, test_fraction=d.test_fraction,
                           seed=cfg.seed, stratify=d.stratify)
        train, valid, test = s.train, s.valid, s.test
    if rep.n_rejected or rep.n_normalised:
        log.warning("%s: %d row(s) rejected, %d normalised", path, rep.n_rejected, rep.n_normalised)
    if d.max_examples:
        train = train[: d.max_examples]
    if not train:
        raise ConfigError(f"data.path: {path} gave no training examples")
    return train, valid, test, path


def _tokenizer_for(cfg: ExperimentConfig, train: list[Example]) -> Tokenizer:
    t = cfg.tokenizer
    if t.path:
        return Tokenizer.load(t.path)
    texts = [e.text for e in train] + [e.response for e in train if e.response]
    return Tokenizer.train(texts, vocab_size=t.vocab_size, model_type=t.model_type,
                           character_coverage=t.character_coverage, on_vocab_too_large=t.on_vocab_too_large)


def _init_from(model: torch.nn.Module, src, source: str) -> dict[str, list[str]]:
    """Copy every weight of a pre-trained bundle whose name and shape match; report the rest."""
    theirs = src.model.state_dict()
    mine = model.state_dict()
    loaded = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
    model.load_state_dict(loaded, strict=False)
    report = {
        "loaded": sorted(loaded),
        "new": sorted(k for k in mine if k not in loaded),
        "dropped": sorted(k for k in theirs if k not in loaded),
    }
    log.info("init_from %s: %d tensors loaded, %d new, %d dropped",
             source, len(report["loaded"]), len(report["new"]), len(report["dropped"]))
    return report


def _sample_replies(model, tok: Tokenizer, examples: list[Example], n: int, max_len: int) -> list[dict[str, str]]:
    from chatforge.decoding import GenerationOptions, generate

    model.eval()
    out = []
    for e in examples[:n]:
        ids = generate(model, tok.encode(e.text)[:max_len], GenerationOptions(max_new_tokens=max_len),
                       bos_id=tok.bos_id, eos_id=tok.eos_id)
        out.append({"question": e.text, "reference": e.response or "", "reply": tok.decode(ids)})
    return out


def run_experiment(cfg: ExperimentConfig, *, callbacks: list[Callback] | None = None,
                   run_dir: str | Path | None = None) -> RunResult:
    seed_everything(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(run_dir) if run_dir else Path(cfg.output.dir) / (cfg.output.run_name or f"{cfg.name}-{stamp}")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", cfg.to_yaml().encode("utf-8"))

    train, valid, test, data_path = load_splits(cfg)
    log.info("data %s: %d train / %d valid / %d test", data_path, len(train), len(valid), len(test))

    init_report, pre = None, None
    if cfg.model.init_from:
        pre = load_bundle(Path(cfg.model.init_from) / "bundle"
                          if (Path(cfg.model.init_from) / "bundle").is_dir() else cfg.model.init_from)
        tok = pre.tokenizer  # a pre-trained model only makes sense with its own vocabulary
    else:
        tok = _tokenizer_for(cfg, train)
    task_def = get_task(cfg.model.task, cfg.model.family)
    labels = label_set(train) if task_def.needs_labels else None
    spec = TaskSpec(cfg.model.task, cfg.model.family, cfg.train.max_source_len, cfg.train.max_target_len, labels)
    model = build_from_config(cfg, tok, labels)
    if cfg.model.init_from:
        init_report = _init_from(model, pre, cfg.model.init_from)

    gen = torch.Generator().manual_seed(cfg.seed)
    train_ds = make_dataset(spec, train, tok)
    train_dl = DataLoader(train_ds, batch_size=cfg.train.batch_size, shuffle=True, generator=gen,
                          collate_fn=train_ds.collate)
    valid_dl = None
    if valid:
        valid_ds = make_dataset(spec, valid, tok)
        valid_dl = DataLoader(valid_ds, batch_size=cfg.train.batch_size, collate_fn=valid_ds.collate)

    trainer = Trainer(model, train_dl, valid_dl, cfg.train,
                      callbacks=[LoggingCallback(), *(callbacks or [])], device=resolve_device(cfg.train.device))
    result = trainer.fit()
    model = trainer.model.to("cpu").eval()

    metrics: dict[str, Any] = {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_examples": len(train), "valid_examples": len(valid), "test_examples": len(test),
        "steps": result.steps, "train_seconds": round(result.seconds, 2),
        "best_epoch": result.best_epoch, "best_valid_loss": result.best_valid_loss,
        "history": result.history,
    }
    best = next((h for h in result.history if h["epoch"] == result.best_epoch), {})
    for k in ("valid_loss", "valid_accuracy"):
        if k in best:
            metrics[k] = best[k]
    if test:
        test_ds = make_dataset(spec, test, tok)
        test_dl = DataLoader(test_ds, batch_size=cfg.train.batch_size, collate_fn=test_ds.collate)
        trainer.model = model
        trainer.device = torch.device("cpu")
        metrics.update({f"test_{k}": v for k, v in trainer.evaluate(test_dl).items()})
    if task_def.generates:
        metrics["samples"] = _sample_replies(model, tok, test or valid or train, 5, cfg.train.max_target_len)
    if init_report:
        metrics["init_from"] = {k: len(v) for k, v in init_report.items()}

    bundle_dir = save_bundle(
        run_dir / "bundle", model=model, tokenizer=tok, config=cfg, labels=labels,
        metrics={k: v for k, v in metrics.items() if k not in ("history", "samples")},
        data_sha256=file_sha256(data_path),
    )
    atomic_write_bytes(run_dir / "metrics.json",
                       (json.dumps(metrics, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    log.info("run saved to %s (bundle %s)", run_dir, bundle_dir)
    return RunResult(run_dir=run_dir, bundle_dir=bundle_dir, metrics=metrics)


