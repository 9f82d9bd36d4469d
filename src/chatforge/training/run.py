"""The run driver: one validated experiment config -> a run folder with a bundle.

runs/<run>/config.yaml      the resolved config (also inside the bundle)
runs/<run>/metrics.json     per-epoch history, best epoch, test metrics, sample replies
runs/<run>/bundle/          what `chatforge serve` loads
runs/<run>/tokenizer.model  the run's tokenizer, written before training (resume reuses it);
                            byte_tokenizer.json with tokenizer.kind byte (fixed, nothing to reuse)
runs/<run>/checkpoints/     last.safetensors, every train.checkpoint_every_steps steps
runs/<run>/mlflow_run_id    the MLflow run this run logs to (resume continues it)

Under torchrun (WORLD_SIZE > 1) every rank runs this; rank 0 chooses the run folder and
trains the tokenizer and broadcasts both, and only rank 0 writes files or tracks.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from chatforge import runtime
from chatforge.bundle import build_from_config, load_bundle, save_bundle, torch_class_probs
from chatforge.config import ConfigError, ExperimentConfig, load_config, validate_config
from chatforge.data import Example, read_examples, sample_corpus_path, split_examples
from chatforge.data.readers import read_outliers
from chatforge.data.splits import fold_ids, hold_out
from chatforge.decoding import GenerationOptions, generate, generate_batch
from chatforge.drafts import DRAFTS_DIR, training_replies
from chatforge.evaluation.metrics import corpus_chrf, generation_quality, selection_report
from chatforge.fileio import atomic_write_bytes
from chatforge.oos import fit_policy, in_scope_only, oos_metrics
from chatforge.tasks import (
    ResegmentedDataset,
    SoftTargetDataset,
    TaskDataError,
    TaskDef,
    TaskSpec,
    get_task,
    label_set,
    make_dataset,
    source_ids,
    with_outliers,
)
from chatforge.tokenizer import ByteTokenizer, Tokenizer
from chatforge.training import distributed as ddp
from chatforge.training.checkpoint import CheckpointCallback, checkpoint_path, load_checkpoint
from chatforge.training.distill import check_crossfit, check_held_out, load_teachers, teacher_probs
from chatforge.training.status import FINISHED, RUNNING, status_of_error, write_status
from chatforge.training.tracking import TrackingCallback, flatten, log_run_outputs, open_tracker, run_tags
from chatforge.training.trainer import Callback, LoggingCallback, Trainer, resolve_device

RUN_TOKENIZER = "tokenizer.model"

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
              label_field=d.label_field, context_field=d.context_field, on_error=d.on_error)
    task_def = _task_def_or_none(cfg)
    if task_def is not None and task_def.load is not None:
        # The task reads its own file format (token tagging); splits work on its examples as on any.
        if d.split == "predefined":
            raise ConfigError(f"data.split: 'predefined' is not available for task {cfg.model.task!r}; "
                              "use 'random'")
        examples = task_def.load(path, d)
        s = split_examples(examples, valid_fraction=d.valid_fraction, test_fraction=d.test_fraction,
                           seed=cfg.seed, stratify=d.stratify)
        train, valid, test = s.train, s.valid, s.test
        rep = None
    elif d.format == "tagged_jsonl":
        raise ConfigError(f"data.format: 'tagged_jsonl' is for task token_classification (family bert); "
                          f"task {cfg.model.task!r} reads auto, chatbot_csv, clinc150, csv, tsv or jsonl")
    elif d.split == "predefined":
        train, rep = read_examples(path, clinc_keys=tuple(d.train_keys), **kw)
        if rep.format != "clinc150":  # other readers ignore the lists: train and valid would be the whole file
            raise ConfigError(f"data.split: 'predefined' reads the train_keys/valid_keys lists of a CLINC150 JSON "
                              f"file; {path} is {rep.format}, which has no such lists, so every example would be in "
                              f"both train and valid: use data.split 'random' (chatforge evaluate: --split all)")
        valid, _ = read_examples(path, clinc_keys=tuple(d.valid_keys), **kw)
        test: list[Example] = []
        if d.dev_fraction:
            # The development test comes out of train, stratified so that every intent and the few
            # out-of-scope examples keep their share; test_fraction plays no part in a predefined split.
            train, test = hold_out(train, d.dev_fraction, seed=d.dev_seed, group_similarity=d.dev_group_similarity,
                                   order=d.dev_split)
    else:
        examples, rep = read_examples(path, **kw)
        s = split_examples(examples, valid_fraction=d.valid_fraction, test_fraction=d.test_fraction,
                           seed=cfg.seed, stratify=d.stratify)
        train, valid, test = s.train, s.valid, s.test
    if rep is not None and (rep.n_rejected or rep.n_normalised):
        log.warning("%s: %d row(s) rejected, %d normalised", path, rep.n_rejected, rep.n_normalised)
    if d.crossfit_fold is not None:
        cf = d.crossfit_fold
        ids = fold_ids(train, cf.folds, cf.seed)
        train = [e for e, f in zip(train, ids, strict=True) if f != cf.fold]
        log.info("data.crossfit_fold: fold %d of %d left out of training (%d examples kept)", cf.fold, cf.folds,
                 len(train))
    if d.max_examples:
        train = train[: d.max_examples]
    if not train:
        raise ConfigError(f"data.path: {path} gave no training examples")
    return train, valid, test, path


def held_out_split(cfg: ExperimentConfig) -> str:
    """The name of the third split in metrics: ``test`` for a random split, ``dev`` for the part a predefined
    (CLINC150) split holds out of its train lists (``data.dev_fraction``), which is not the official test list."""
    return "dev" if cfg.data.split == "predefined" else "test"


def _task_def_or_none(cfg: ExperimentConfig) -> TaskDef | None:
    # Estimator families and unknown tasks fail later with their own messages; here only a
    # task's own data loader matters.
    try:
        return get_task(cfg.model.task, cfg.model.family)
    except TaskDataError:
        return None


def _tokenizer_for(cfg: ExperimentConfig, train: list[Example]) -> Tokenizer:
    t = cfg.tokenizer
    if t.kind == "byte":
        return ByteTokenizer()  # fixed vocabulary: no training, no vocab_size suggestion or lowering
    if t.path:
        return Tokenizer.load(t.path)
    texts = [e.text for e in train] + [e.response for e in train if e.response]
    return Tokenizer.train(texts, vocab_size=t.vocab_size, model_type=t.model_type,
                           character_coverage=t.character_coverage, on_vocab_too_large=t.on_vocab_too_large)


def init_from_config(cfg: ExperimentConfig, pre) -> ExperimentConfig:
    """The config a fine-tune of the bundle ``pre`` (``model.init_from``) trains with.

    The architecture keys (the family config's ``ARCHITECTURE_KEYS``, e.g. GPT's d_model, n_layers, variant)
    that ``cfg`` leaves out are the pre-trained model's, so a fine-tune config need not copy a checkpoint's
    shapes; those it sets must build the same network, else a ConfigError names both values. Families that
    declare no such keys are unchanged (the config must spell their shapes)."""
    src = cfg.model.init_from
    if pre.config.model.family != cfg.model.family:
        raise ConfigError(f"model.init_from={src}: that bundle is a {pre.config.model.family!r} model; this config "
                          f"trains family {cfg.model.family!r}. Fine-tune a bundle of the same family")
    keys = getattr(cfg.model.spec.config_cls, "ARCHITECTURE_KEYS", ())
    if not keys:
        return cfg
    mine, theirs = cfg.model.params, pre.config.model.params
    taken = {k: theirs[k] for k in keys if k in theirs and k not in mine}
    if taken:
        tree = cfg.to_dict()
        tree["model"].update(taken)
        cfg = validate_config(tree, source=f"config + model.init_from={src}")
        log.info("init_from %s: architecture from the pre-trained bundle: %s", src,
                 ", ".join(f"{k}={v}" for k, v in taken.items()))
    want = pre.config.model.family_config().architecture()
    have = cfg.model.family_config().architecture()
    bad = [k for k in want if have[k] != want[k]]
    if bad:
        raise ConfigError(
            f"model.init_from={src}: the config disagrees with the pre-trained model on "
            + "; ".join(f"model.{k}: config {have[k]!r}, pre-trained {want[k]!r}" for k in bad)
            + ". Remove these keys from the config (they are then taken from the pre-trained bundle) or set "
              "them to its values")
    return cfg


def _init_from(model: torch.nn.Module, src, source: str) -> dict[str, list[str]]:
    """Copy every weight of a pre-trained bundle whose name and shape match; report the rest."""
    theirs = src.model.state_dict()
    mine = model.state_dict()
    loaded = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
    if not loaded:
        # Nothing in common is a wrong init_from (another architecture), never a fine-tune.
        raise ConfigError(f"model.init_from={source}: none of its {len(theirs)} tensors matches this model's "
                          f"names and shapes (e.g. {next(iter(theirs), '-')}); is it the right bundle?")
    model.load_state_dict(loaded, strict=False)
    report = {
        "loaded": sorted(loaded),
        "new": sorted(k for k in mine if k not in loaded),
        "dropped": sorted(k for k in theirs if k not in loaded),
    }
    log.info("init_from %s: %d tensors loaded, %d new, %d dropped",
             source, len(report["loaded"]), len(report["new"]), len(report["dropped"]))
    return report


def _sample_replies(model, tok: Tokenizer, examples: list[Example], n: int, max_len: int,
                    context_turns: int = 0) -> list[dict[str, str]]:
    model.eval()
    out = []
    for e, src in zip(examples[:n], source_ids(tok, examples[:n], max_len, context_turns), strict=True):
        ids = generate(model, src or [tok.unk_id], GenerationOptions(max_new_tokens=max_len),
                       bos_id=tok.bos_id, eos_id=tok.eos_id)
        out.append({"question": e.text, "reference": e.response or "", "reply": tok.decode(ids)})
    return out


def chrf_monitor(tok: Tokenizer, examples: list[Example], cfg: ExperimentConfig,
                 batch_size: int = 64) -> Callable[[Any], dict[str, float]]:
    """``train.monitor: valid_chrf``: the chrF of greedy replies to the first ``train.monitor_examples``
    validation questions (their inputs built as in training, context included), for the trainer to call each
    epoch. Rows decode together (``generate_batch``; greedy, so each equals decoding it alone)."""
    sample = [e for e in examples if e.response][: cfg.train.monitor_examples]
    if not sample:
        raise ConfigError("train.monitor='valid_chrf' needs validation examples with replies; the validation "
                          "split is empty (set data.valid_fraction > 0)")
    sources = [s or [tok.unk_id] for s in source_ids(tok, sample, cfg.train.max_source_len, cfg.data.context_turns)]
    refs = [e.response for e in sample]
    opts = GenerationOptions(max_new_tokens=cfg.train.max_target_len)

    def metrics(model) -> dict[str, float]:
        hyps: list[str] = []
        for i in range(0, len(sources), batch_size):
            out = generate_batch(model, sources[i:i + batch_size], opts, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                 pad_id=tok.pad_id)
            hyps.extend(tok.decode(ids) for ids in out)
        return {"chrf": corpus_chrf(hyps, refs)}

    return metrics


def resume_experiment(run_dir: str | Path, *, callbacks: list[Callback] | None = None) -> RunResult:
    """Continue an interrupted run from its last checkpoint, with the config saved in the run."""

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir}: not a run folder (no config.yaml inside)")
    if not checkpoint_path(run_dir).is_file():
        raise ConfigError(f"--resume {run_dir}: no checkpoint at {checkpoint_path(run_dir)}; "
                          f"set train.checkpoint_every_steps to make runs resumable")
    cfg = load_config(run_dir / "config.yaml")
    return run_experiment(cfg, callbacks=callbacks, run_dir=run_dir, resume=True)


def _features(cfg: ExperimentConfig, tok: Tokenizer, data_path: Path, data_sha: str,
              n: tuple[int, int, int]) -> dict[str, Any]:
    return {
        "features.tokenizer.source": cfg.tokenizer.path or ("init_from" if cfg.model.init_from else
                                                            "fixed" if cfg.tokenizer.kind == "byte" else "trained"),
        "features.tokenizer.kind": cfg.tokenizer.kind,
        "features.tokenizer.sha256": tok.sha256,
        "features.tokenizer.vocab_size": tok.vocab_size,
        "features.tokenizer.model_type": cfg.tokenizer.model_type if cfg.tokenizer.kind == "sentencepiece" else "-",
        "features.data.path": str(data_path),
        "features.data.sha256": data_sha,
        "features.data.train_examples": n[0],
        "features.data.valid_examples": n[1],
        "features.data.test_examples": n[2],
    }


def run_experiment(cfg: ExperimentConfig, *, callbacks: list[Callback] | None = None,
                   run_dir: str | Path | None = None, resume: bool = False,
                   tracking_tags: dict[str, str] | None = None) -> RunResult:
    """Train ``cfg`` into a run folder; ``resume=True`` continues ``run_dir`` from its checkpoint.

    ``tracking_tags`` are added to the MLflow run (a sweep passes its study and parent run).
    """
    seed_everything(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    else:  # the CPUs this process may use (affinity, cgroup quota), shared by torchrun's local processes
        runtime.configure_threads(share=int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    device = resolve_device(cfg.train.device)
    owns_group = ddp.launched_distributed() and not torch.distributed.is_initialized()
    ctx = ddp.init_distributed(device) if ddp.launched_distributed() else ddp.SINGLE
    device = ddp.distributed_device(device, ctx)
    try:
        return _run(cfg, ctx, device, callbacks or [], run_dir, resume, tracking_tags or {})
    finally:
        if owns_group:
            ddp.cleanup(ctx)


# What an earlier run leaves in its folder besides config.yaml and the tokenizer (which a new run rewrites).
EARLIER_RUN_OUTPUTS = ("checkpoints", "bundle", "metrics.json", "mlflow_run_id", "eval")


def _clear_earlier_run(run_dir: Path) -> None:
    """A new run into the folder of an earlier one (``--run-dir`` again) starts from a clean folder: else its
    config.yaml sat beside the earlier run's bundle, metrics and evaluations until it finished (for good if it
    failed), and ``--resume`` loaded the earlier run's checkpoint into the new config. Other files are kept."""
    gone = []
    for name in EARLIER_RUN_OUTPUTS:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        gone.append(name)
    if gone:
        log.warning("%s held an earlier run: removed its %s (a new run starts here; --resume continues a run)",
                    run_dir, ", ".join(gone))


def _run(cfg: ExperimentConfig, ctx: ddp.DistributedContext, device: torch.device, callbacks: list[Callback],
         run_dir: str | Path | None, resume: bool, tracking_tags: dict[str, str]) -> RunResult:
    if resume and run_dir is None:
        raise ConfigError("resume needs the run folder to continue")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(run_dir) if run_dir else Path(cfg.output.dir) / (cfg.output.run_name or f"{cfg.name}-{stamp}")
    run_dir = Path(ddp.broadcast_object(str(run_dir), ctx))  # one folder even if ranks' clocks differ
    main = ctx.is_main
    pre = None
    if cfg.model.init_from:
        pre = load_bundle(Path(cfg.model.init_from) / "bundle"
                          if (Path(cfg.model.init_from) / "bundle").is_dir() else cfg.model.init_from)
        cfg = init_from_config(cfg, pre)  # before config.yaml: the run records the network it trains
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # under a file, a name too long for the filesystem, no permission: before any work
            raise ConfigError(f"cannot create the run folder {run_dir}: {e.strerror or e}") from None
        if not resume:
            _clear_earlier_run(run_dir)
            atomic_write_bytes(run_dir / "config.yaml", cfg.to_yaml().encode("utf-8"))
        # status.json says whether the run finished: `chatforge compare` marks a run that stopped half-way (and a
        # `running` one whose process is gone reads as killed: SIGKILL lets nothing else be written).
        _set_status(run_dir, RUNNING)
    try:
        result = _train_into(cfg, ctx, device, callbacks, run_dir, resume, tracking_tags, pre)
    except BaseException as e:
        if main:
            _set_status(run_dir, status_of_error(e), e)
        raise
    if main:
        _set_status(run_dir, FINISHED)
    return result


def _set_status(run_dir: Path, status: str, error: BaseException | None = None) -> None:
    try:
        write_status(run_dir, status, error)
    except OSError as e:  # a full disk must not hide the run's own outcome (or its error)
        log.warning("cannot record the run's status (%s) in %s: %s", status, run_dir, e)


def _train_into(cfg: ExperimentConfig, ctx: ddp.DistributedContext, device: torch.device, callbacks: list[Callback],
                run_dir: Path, resume: bool, tracking_tags: dict[str, str], pre) -> RunResult:
    """The run once its folder exists: data, tokenizer, model, training or fitting, the bundle and metrics."""
    main = ctx.is_main
    train, valid, test, data_path = load_splits(cfg)
    log.info("data %s: %d train / %d valid / %d %s", data_path, len(train), len(valid), len(test),
             held_out_split(cfg))
    if cfg.data.unlabelled:
        extra = read_outliers(resolve_data_path(cfg.data.unlabelled), key="data.unlabelled")
        train = [*train, *(Example(text=t, source=f"{cfg.data.unlabelled}:{i + 1}") for i, t in enumerate(extra))]
        log.info("data.unlabelled: %d sentences from %s join the %d training texts", len(extra),
                 cfg.data.unlabelled, len(train) - len(extra))
    # Read (and refused if missing or empty) before anything is trained.
    outliers = read_outliers(resolve_data_path(cfg.data.outliers)) if cfg.data.outliers else None
    teachers: list | None = None
    folds: list[int] | None = None
    if cfg.train.distill_from:
        teachers = load_teachers(cfg.train.distill_from)
        for teacher in teachers:  # before anything is trained: a leaking teacher is refused
            check_held_out(teacher, test, load_splits)
        if len(teachers) > 1:
            folds = check_crossfit(teachers, train, load_splits)

    if cfg.model.spec.kind != "torch":
        # Estimators (xgboost, linear, ensemble) fit themselves on the train split: no tokenizer, no Trainer.
        if not main:
            return RunResult(run_dir=run_dir, bundle_dir=run_dir / "bundle")
        return _run_estimator(cfg, run_dir, train, valid, test, data_path, tracking_tags)
    oos_data = (train, valid, test)
    if cfg.oos.policy == "binary" and cfg.model.task == "classification":
        # oos-binary: the intent model never sees oos examples; the detector learns from all of them.

        train, valid, test = (in_scope_only(x, cfg.oos.label) for x in (train, valid, test))

    init_report = None
    if pre is not None:
        tok = pre.tokenizer  # a pre-trained model only makes sense with its own vocabulary
        log.info("init_from %s: its %s tokenizer (%d ids) is used; the config's tokenizer section is not",
                 cfg.model.init_from, tok.kind, tok.vocab_size)
    elif cfg.tokenizer.kind == "byte":
        tok = _tokenizer_for(cfg, train)  # fixed: every rank builds the same one, nothing to broadcast
    elif resume:
        tok = Tokenizer.load(run_dir / RUN_TOKENIZER)  # the exact vocabulary the checkpoint was trained with
    else:
        # Rank 0 trains it and the others receive its bytes: every rank must share one vocabulary.
        proto = _tokenizer_for(cfg, train).model_proto if main else None
        tok = Tokenizer(ddp.broadcast_object(proto, ctx))
    if main and not resume:
        # SentencePiece keeps the run folder's historical name; other kinds (byte, hf) their own file name.
        name = RUN_TOKENIZER if tok.kind == "sentencepiece" else tok.filename
        atomic_write_bytes(run_dir / name, tok.to_bytes())
    task_def = get_task(cfg.model.task, cfg.model.family)
    labels = task_def.label_set(train) if task_def.needs_labels else None
    spec = TaskSpec(cfg.model.task, cfg.model.family, cfg.train.max_source_len, cfg.train.max_target_len, labels,
                    cfg.data.context_turns)
    model = build_from_config(cfg, tok, labels)
    if cfg.model.init_from:
        init_report = _init_from(model, pre, cfg.model.init_from)

    def build_train(t) -> Dataset:
        ds = make_dataset(spec, train, t)
        return with_outliers(spec, ds, outliers, t) if outliers is not None else ds

    if cfg.train.subword_alpha > 0:
        train_ds = ResegmentedDataset(build_train, tok, cfg.train.subword_alpha, cfg.train.subword_nbest, cfg.seed)
        log.info("subword regularization: the training texts are segmented afresh each epoch, sampled with alpha %g "
                 "from %s", cfg.train.subword_alpha, "every segmentation" if cfg.train.subword_nbest < 0
                 else f"the {cfg.train.subword_nbest} best segmentations")
    else:
        train_ds = build_train(tok)
    if outliers is not None:
        log.info("outlier exposure: %d unlabelled sentences from %s mixed into %d training examples, weight %g",
                 len(outliers), cfg.data.outliers, len(train), cfg.train.outlier_weight)
    if teachers is not None:
        assert labels is not None  # distillation is for classification (validated with the config)
        if folds is None:
            probs = teacher_probs(teachers[0], [e.text for e in train], labels)
        else:  # cross-fitted: each fold's rows from the run that did not see them
            probs = torch.zeros((len(train), len(labels)))
            for i, teacher in enumerate(teachers):
                rows = [j for j, f in enumerate(folds) if f == i]
                probs[rows] = teacher_probs(teacher, [train[j].text for j in rows], labels)
        if outliers is not None:  # outlier rows carry placeholder targets: the Trainer distils labelled rows only
            probs = torch.cat([probs, torch.full((len(outliers), len(labels)), 1.0 / len(labels))])
        train_ds = SoftTargetDataset(train_ds, probs)
        agree = float((probs[: len(train)].argmax(1) == torch.tensor([labels.index(e.label) for e in train])).float()
                      .mean()) if len(train) else 0.0
        log.info("distillation from %s: soft targets for %d training examples (the teacher's argmax agrees with "
                 "the label on %.1f %%), weight %g, temperature %g", cfg.train.distill_from, len(train), 100 * agree,
                 cfg.train.distill_weight, cfg.train.distill_temperature)
        del teachers
    # The epoch's order is a function of (seed, epoch) alone: exact resume without generator state,
    # and one process over the global batch sees what N DDP ranks see together.
    sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=cfg.seed)
    train_dl = DataLoader(train_ds, batch_size=ddp.per_rank_batch_size(cfg.train.batch_size, ctx),
                          sampler=sampler, collate_fn=train_ds.collate)
    valid_dl = None
    if valid:
        # Every rank validates on the whole set, so early stopping and best-epoch choices agree.
        valid_ds = make_dataset(spec, valid, tok)
        valid_dl = DataLoader(valid_ds, batch_size=cfg.train.batch_size, collate_fn=valid_ds.collate)

    data_sha = file_sha256(data_path)
    tracker = None
    if main:
        tracker = open_tracker(cfg)
    extra: list[Callback] = []
    if tracker is not None:
        id_file = run_dir / "mlflow_run_id"
        prior = id_file.read_text().strip() if resume and id_file.is_file() else None
        tracker.start(run_dir.name, run_tags(cfg, tracking_tags), resume_run_id=prior)
        atomic_write_bytes(id_file, tracker.run_id.encode())
        if not prior:
            tracker.log_params({**flatten(cfg.to_dict()),
                                **_features(cfg, tok, data_path, data_sha, (len(train), len(valid), len(test)))})
        extra.append(TrackingCallback(tracker))
    if cfg.train.checkpoint_every_steps:
        extra.append(CheckpointCallback(run_dir, cfg.train.checkpoint_every_steps, is_main=main))

    valid_metrics = chrf_monitor(tok, valid, cfg) if cfg.train.monitor == "valid_chrf" else None
    trainer = Trainer(model, train_dl, valid_dl, cfg.train,
                      callbacks=[LoggingCallback(), *extra, *callbacks], device=device, distributed=ctx,
                      valid_metrics=valid_metrics)
    if resume:
        trainer.load_state_dict(load_checkpoint(checkpoint_path(run_dir)))
    try:
        result = trainer.fit()
        if not main:
            return RunResult(run_dir=run_dir, bundle_dir=run_dir / "bundle",
                             metrics={"steps": result.steps, "history": result.history})
        out = _finish(cfg, trainer, result, tok, labels, spec, task_def, train, valid, test, data_sha,
                      init_report, run_dir, oos_data=oos_data)
    except BaseException as e:
        if tracker is not None:
            # An Optuna prune or Ctrl-C is a deliberate stop, not a failure (MLflow's KILLED).
            tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) or type(e).__name__ == "TrialPruned"
                        else "FAILED")
        raise
    if tracker is not None:
        log_run_outputs(tracker, run_dir, out.metrics, log_bundle=cfg.tracking.log_bundle)
        out.metrics["mlflow_run_id"] = tracker.run_id
        tracker.end("FINISHED")
    return out


def _finish(cfg, trainer, result, tok, labels, spec, task_def, train, valid, test, data_sha, init_report,
            run_dir: Path, oos_data: tuple | None = None) -> RunResult:
    model = trainer.model.to("cpu").eval()

    metrics: dict[str, Any] = {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_examples": len(train), "valid_examples": len(valid), f"{held_out_split(cfg)}_examples": len(test),
        "steps": result.steps, "train_seconds": round(result.seconds, 2), "train_precision": trainer.precision,
        "best_epoch": result.best_epoch, "best_valid_loss": result.best_valid_loss,
        "monitor": cfg.train.monitor, "best_score": result.best_score,
        "history": result.history,
    }
    best = next((h for h in result.history if h["epoch"] == result.best_epoch), {})
    for k in ("valid_loss", "valid_accuracy", "valid_chrf"):
        if k in best:
            metrics[k] = best[k]
    if test:
        test_ds = make_dataset(spec, test, tok)
        test_dl = DataLoader(test_ds, batch_size=cfg.train.batch_size, collate_fn=test_ds.collate)
        trainer.model = model
        trainer.device = torch.device("cpu")
        metrics.update({f"{held_out_split(cfg)}_{k}": v for k, v in trainer.evaluate(test_dl).items()})
    if task_def.generates:
        metrics["samples"] = _sample_replies(model, tok, test or valid or train, 5, cfg.train.max_target_len,
                                             cfg.data.context_turns)
    if init_report:
        metrics["init_from"] = {k: len(v) for k, v in init_report.items()}

    extra_metadata, extra_dirs = None, None
    all_train, all_valid, all_test = oos_data or (train, valid, test)
    if cfg.model.task == "classification" and labels and (
            cfg.oos.policy != "train" or any(e.label == cfg.oos.label for e in all_valid)):
        def probs(texts: list[str]) -> np.ndarray:
            return torch_class_probs(model, tok, texts, cfg.train.max_source_len)

        policy, oos_eval = _fit_oos_and_evaluate(cfg, probs, labels, all_train, all_valid, all_test)
        metrics.update(oos_eval)
        extra_metadata = {"oos": policy.to_metadata()}
        extra_dirs = policy.extra_dirs()
    if task_def.generates and tok is not None:
        # The training replies, the datastore of speculative decoding when served (chatforge.drafts); the same
        # call rebuilds it for a bundle saved without it (training.bundle_drafts).
        drafts = training_replies(train, tok)
        if drafts is not None:
            extra_dirs = {**(extra_dirs or {}), DRAFTS_DIR: drafts}
    bundle_dir = save_bundle(
        run_dir / "bundle", model=model, tokenizer=tok, config=cfg, labels=labels,
        metrics={k: v for k, v in metrics.items() if k not in ("history", "samples")},
        data_sha256=data_sha, extra_metadata=extra_metadata, extra_dirs=extra_dirs,
    )
    atomic_write_bytes(run_dir / "metrics.json",
                       (json.dumps(metrics, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    log.info("run saved to %s (bundle %s)", run_dir, bundle_dir)
    return RunResult(run_dir=run_dir, bundle_dir=bundle_dir, metrics=metrics)


def _fit_oos_and_evaluate(cfg: ExperimentConfig, probs, labels: list[str], train: list[Example],
                          valid: list[Example], test: list[Example], views=None):
    """Fit the config's oos policy, then score valid/test with it: accuracy, in-scope accuracy, OOS recall.

    ``views``: the model's probabilities per view (an ensemble's ``predict_views``; default
    ``[probs]``), read by ``oos.policy: scorer``. With ``oos.policy: threshold`` (or ``scorer``) the
    threshold is chosen on the same validation split, so the valid_* numbers are optimistic; report held-out (test) numbers, or cross-fit as
    benchmarks/clinc150_results.py does.
    """

    known = set(labels)
    fit_valid = [e for e in valid if e.label in known or e.label == cfg.oos.label]
    policy = fit_policy(cfg.oos, probs, labels, [e.text for e in fit_valid], [e.label for e in fit_valid],
                        [e.text for e in train], [e.label for e in train], seed=cfg.seed, predict_views=views)
    out: dict[str, Any] = {}
    for split, examples in (("valid", valid), (held_out_split(cfg), test)):
        if not examples:
            continue
        texts, y = [e.text for e in examples], [str(e.label) for e in examples]
        if policy.needs_views and views is not None:
            v = views(texts)
            pred = policy.decide(v[0], labels, texts, v)
        else:
            pred = policy.decide(probs(texts), labels, texts)
        out[f"{split}_accuracy"] = float(np.mean([a == b for a, b in zip(pred, y, strict=True)]))
        if cfg.oos.label in y:
            m = oos_metrics(y, pred, cfg.oos.label)
            out[f"{split}_in_scope_accuracy"], out[f"{split}_oos_recall"] = m["in_scope_accuracy"], m["oos_recall"]
    if policy.policy == "threshold":
        out["oos_threshold"] = policy.threshold
    elif policy.policy in ("binary", "scorer"):
        out["oos_detector_threshold"] = policy.detector_threshold
    return policy, out


DEV_KEYS = ("dev_fraction", "dev_seed", "dev_group_similarity", "dev_split", "crossfit_fold")


def _check_members_dev_split(cfg: ExperimentConfig, model) -> None:
    """An ensemble's dev figures are held out only if every member held out the same examples."""
    if not cfg.data.dev_fraction:
        return
    want = [getattr(cfg.data, k) for k in DEV_KEYS]
    for path, member in zip(getattr(model, "member_paths", []), getattr(model, "members", []), strict=False):
        mcfg = getattr(member, "config", None)
        if mcfg is None:
            continue
        had = [getattr(mcfg.data, k) for k in DEV_KEYS]
        if had != want:
            raise ConfigError(
                f"ensemble member {path} was trained with data {dict(zip(DEV_KEYS, had, strict=True))}, this "
                f"ensemble holds out {dict(zip(DEV_KEYS, want, strict=True))}: the member has seen the ensemble's "
                "dev examples; retrain it with the same data.dev_* keys")


def _run_estimator(cfg: ExperimentConfig, run_dir: Path, train: list[Example], valid: list[Example],
                   test: list[Example], data_path: Path, tracking_tags: dict[str, str]) -> RunResult:
    """Fit an estimator family (kind != "torch") on the train split and bundle it with its own save()."""


    if cfg.model.task == "selection":
        return _run_selection(cfg, run_dir, train, valid, test, data_path)
    if cfg.model.task != "classification":
        raise ConfigError(f"model.family {cfg.model.family!r} is an estimator; it supports task classification only")
    all_train, all_valid, all_test = train, valid, test
    if cfg.oos.policy == "binary":
        train, valid, test = (in_scope_only(x, cfg.oos.label) for x in (train, valid, test))
    labels = label_set(train)
    known = set(labels)
    fit_valid = [e for e in valid if e.label in known]  # a random split can put a rare label only in valid
    model = build_from_config(cfg, None, labels)
    data_sha = file_sha256(data_path)
    tracker = None

    tracker = open_tracker(cfg)
    if tracker is not None:
        tracker.start(run_dir.name, run_tags(cfg, tracking_tags))
        atomic_write_bytes(run_dir / "mlflow_run_id", tracker.run_id.encode())
        tracker.log_params({**flatten(cfg.to_dict()), "features.data.path": str(data_path),
                            "features.data.sha256": data_sha, "features.data.train_examples": len(train),
                            "features.data.valid_examples": len(valid), "features.data.test_examples": len(test)})
    try:
        t0 = time.perf_counter()
        model.fit([e.text for e in train], [e.label for e in train],
                  [e.text for e in fit_valid] or None, [e.label for e in fit_valid] or None)
        seconds = time.perf_counter() - t0
        _check_members_dev_split(cfg, model)
        labels = list(model.labels)  # an ensemble's labels are its members'
        policy, oos_eval = _fit_oos_and_evaluate(cfg, model.predict_proba, labels, all_train, all_valid, all_test,
                                                 views=getattr(model, "predict_views", None))
        metrics: dict[str, Any] = {
            "kind": "estimator", "num_parameters": None,
            "train_examples": len(train), "valid_examples": len(valid), f"{held_out_split(cfg)}_examples": len(test),
            "steps": 0, "train_seconds": round(seconds, 2), "best_epoch": None, "best_valid_loss": None,
            "history": [], **oos_eval,
        }
        bundle_dir = save_bundle(
            run_dir / "bundle", model=model, tokenizer=None, config=cfg, labels=labels,
            metrics={k: v for k, v in metrics.items() if k != "history"}, data_sha256=data_sha,
            extra_metadata={"oos": policy.to_metadata()},
            extra_dirs=policy.extra_dirs(),
        )
        atomic_write_bytes(run_dir / "metrics.json",
                           (json.dumps(metrics, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
        log_run_outputs(tracker, run_dir, metrics, log_bundle=cfg.tracking.log_bundle)
        metrics["mlflow_run_id"] = tracker.run_id
        tracker.end("FINISHED")
    log.info("estimator run saved to %s (bundle %s, %.1f s)", run_dir, bundle_dir, seconds)
    return RunResult(run_dir=run_dir, bundle_dir=bundle_dir, metrics=metrics)


# Candidate sets are seeded per split, so valid and test draw different distractors and every run and
# `chatforge evaluate` draw the same ones.
SELECTION_SPLIT_SEEDS = {"valid": 1, "test": 2, "all": 3}


def selection_seed(seed: int, split: str) -> int:
    return seed * 1000 + SELECTION_SPLIT_SEEDS.get(split, 0)


def _run_selection(cfg: ExperimentConfig, run_dir: Path, train: list[Example], valid: list[Example],
                   test: list[Example], data_path: Path) -> RunResult:
    """Fit a response selector on the train pairs (its pool: their deduplicated answers) and report R@1 / MRR."""
    def pairs(examples: list[Example], split: str) -> tuple[list[str], list[str]]:
        missing = sum(1 for e in examples if not e.response)
        if missing:
            raise ConfigError(f"task selection needs a response for every example; {missing} {split} example(s) "
                              f"in {data_path} have none (data.response_field)")
        return [e.text for e in examples], [e.response for e in examples]

    (tq, ta), (vq, va), (sq, sa) = pairs(train, "train"), pairs(valid, "valid"), pairs(test, "test")
    model = build_from_config(cfg, None, None)
    t0 = time.perf_counter()
    # The pairs' labels (ChatbotData's 0/1/2 topic), when every training pair has one: the ranker's label features.
    labels = [e.label for e in train] if all(e.label for e in train) else None
    model.fit(tq, ta, vq or None, va or None, labels=labels)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {
        "kind": "estimator", "train_examples": len(train), "valid_examples": len(valid), "test_examples": len(test),
        "pool_size": len(model.pool), "train_seconds": round(seconds, 2), "history": model.history,
    }
    for split, q, a in (("valid", vq, va), ("test", sq, sa)):
        if q:
            rep = selection_report(model.score, q, a, selection_seed(cfg.seed, split))
            metrics.update({f"{split}_{k}": v for k, v in rep.items()})
            replies = [r[0][0] for r in model.select(q)]
            metrics.update({f"{split}_{k}": v for k, v in generation_quality(q, replies, a).items()})
    data_sha = file_sha256(data_path)
    bundle_dir = save_bundle(run_dir / "bundle", model=model, tokenizer=None, config=cfg, labels=None,
                             metrics={k: v for k, v in metrics.items() if k != "history"}, data_sha256=data_sha)
    atomic_write_bytes(run_dir / "metrics.json",
                       (json.dumps(metrics, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    log.info("selection run saved to %s (bundle %s, %.1f s)", run_dir, bundle_dir, seconds)
    return RunResult(run_dir=run_dir, bundle_dir=bundle_dir, metrics=metrics)
