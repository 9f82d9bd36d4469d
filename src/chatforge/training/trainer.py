"""A family-agnostic trainer.

It knows nothing of model families: it moves a batch (a dict of tensors) to the
device, calls ``model(**batch)``, reads ``output.loss`` (and ``output.losses`` for
the parts), steps AdamW with warmup + decay and gradient clipping, validates each
epoch, keeps the best weights, and reports through callbacks.

Resumable: :meth:`Trainer.state_dict` captures model, optimizer, scheduler, RNG states
and the exact data position (epoch, batches done in it, the sampler's epoch seed or the
loader generator's state at the start of the epoch), and :meth:`Trainer.load_state_dict`
restores them so training continues as if never interrupted.

Distributed: given a :class:`~chatforge.training.distributed.DistributedContext` with
``world_size > 1`` the model is wrapped in DistributedDataParallel (gradients are
averaged across ranks, so each rank's loader must carry its share of the global batch).
``self.model`` stays the plain module for evaluation, state dicts and saving.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from chatforge.config import TrainConfig
from chatforge.modules.linear import OneDNNTrainingLinear, onednn_training_linear
from chatforge.runtime import fp32_linear_kernels, pick_train_precision, read_cpu_flags
from chatforge.tasks import (
    IGNORE_INDEX,
    OUTLIER_MASK,
    TEACHER_PROBS,
    FeatureBank,
    distillation_loss,
    outlier_exposure_loss,
    supervised_contrastive_loss,
)
from chatforge.training.schedules import build_scheduler

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return dev


class Callback:
    """Hooks the trainer calls; all optional."""

    def on_train_start(self, trainer: Trainer, total_steps: int) -> None: ...
    def on_step_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...


class LoggingCallback(Callback):
    def on_epoch_end(self, trainer, epoch, logs):
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))


class EarlyStopping(Callback):
    def __init__(self, patience: int):
        self.patience = patience

    def on_epoch_end(self, trainer, epoch, logs):
        if trainer.epochs_since_best >= self.patience:
            log.info("early stopping: no improvement of %s for %d epoch(s)", trainer.cfg.monitor, self.patience)
            trainer.should_stop = True


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_valid_loss: float = math.inf
    best_score: float | None = None  # the monitored figure at best_epoch (train.monitor)
    steps: int = 0
    seconds: float = 0.0


def resolve_train_precision(requested: str, device: torch.device) -> str:
    """The precision a run trains in: ``auto`` resolved for the device (:func:`pick_train_precision`), and a
    warning where ``bf16`` was asked for on a CPU that only emulates it."""
    if device.type not in ("cpu", "cuda") or requested == "fp32":
        return "fp32" if requested == "auto" else requested
    model, flags = read_cpu_flags()
    picked, reason = pick_train_precision(
        flags, device.type, cuda_bf16=device.type == "cuda" and torch.cuda.is_bf16_supported())
    if requested == "auto":
        log.info("train.precision auto -> %s: %s", picked, reason)
        return picked
    if picked == "fp32" and device.type == "cpu":
        log.warning("train.precision bf16 on %s: %s; training steps will be many times slower than fp32 "
                    "(10-28x measured on an AMD EPYC with AVX2 only): use train.precision auto or fp32",
                    model or "this CPU", reason)
    return requested


def fp32_training_linear(precision: str, device: torch.device) -> OneDNNTrainingLinear | None:
    """The mode a run's forwards run in so that its fp32 linear layers train on oneDNN's matmul, or None (torch's).

    Where ``runtime.fp32_linear_kernels`` picks oneDNN (AMD CPUs by default; ``CHATFORGE_FP32_LINEAR``): torch's CPU
    matmul is oneMKL's sgemm, which on the AMD EPYC (Zen 5) measured here ran at about 220 GFLOP/s where oneDNN's ran
    the same fp32 matmuls at 400-540 (``benchmarks/train_linear.py``); a linear layer's forward and backward together
    1.5-2.1x faster at training sizes. Same arithmetic (fp32 throughout); results differ by float rounding."""
    if precision != "fp32" or device.type != "cpu":
        return None
    kernels, why = fp32_linear_kernels()
    if kernels != "onednn":
        log.info("fp32 linear layers train on torch's matmul (%s)", why)
        return None
    mode = onednn_training_linear()
    if mode is None:
        log.info("fp32 linear layers train on torch's matmul (oneDNN's linear op is unavailable in this torch build)")
    else:
        log.info("fp32 linear layers train on oneDNN's matmul (%s)", why)
    return mode


def _accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Correct and counted predictions, padding (-100) excluded; works for (B,T,V) and (B,C)."""
    if logits.shape[:-1] != labels.shape:
        return 0, 0
    mask = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & mask
    return int(correct.sum()), int(mask.sum())


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        train_loader: DataLoader,
        valid_loader: DataLoader | None,
        cfg: TrainConfig,
        *,
        callbacks: Iterable[Callback] = (),
        device: torch.device | None = None,
        distributed: Any = None,
        valid_metrics: Callable[[nn.Module], dict[str, float]] | None = None,
    ):
        self.cfg = cfg
        # Extra validation figures computed each epoch on the eval-mode model (e.g. chrF of greedy replies),
        # merged into the epoch's logs as valid_<name>, before the monitored figure picks the best epoch.
        self.valid_metrics = valid_metrics
        self.device = device or resolve_device(cfg.device)
        self.precision = resolve_train_precision(cfg.precision, self.device)
        self.linear_mode = fp32_training_linear(self.precision, self.device)
        self.model = model.to(self.device)
        self.distributed = distributed
        # The module the training step calls: DDP all-reduces gradients during backward.
        self._train_model: nn.Module = self.model
        if distributed is not None and distributed.world_size > 1:
            self._train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.callbacks = list(callbacks)
        if cfg.early_stopping_patience:
            self.callbacks.append(EarlyStopping(cfg.early_stopping_patience))
        steps_per_epoch = max(1, len(train_loader))
        self.total_steps = steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        # No weight decay on biases and norms (standard AdamW practice).
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.betas),
        )
        self.scheduler = build_scheduler(
            self.optimizer, total_steps=self.total_steps,
            warmup_steps=int(cfg.warmup_ratio * self.total_steps), kind=cfg.schedule,
        )
        self.step = 0
        self.epoch = 0
        self.should_stop = False
        self.epochs_since_best = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.result = TrainResult()
        # Data position within the current epoch, and what reproduces the epoch's order.
        self.batches_done = 0
        self._epoch_acc: dict[str, Any] = _fresh_acc()
        self._epoch_loader_state: torch.Tensor | None = None
        self._resume: dict[str, Any] | None = None
        self._seconds_before = 0.0
        self._pending_rng: dict[str, Any] | None = None
        self._fit_started: float | None = None
        # train.contrastive_weight: the head's input, captured by a forward pre-hook during training steps
        self._bank: FeatureBank | None = None
        self._head_input: torch.Tensor | None = None
        if cfg.contrastive_weight > 0:
            head = getattr(self.model, "head", None)
            head = head if isinstance(head, nn.Module) else getattr(self.model, "classifier", None)
            if not isinstance(head, nn.Module):
                raise ValueError(f"train.contrastive_weight needs a classifier whose head is a module named 'head' or "
                                 f"'classifier'; {type(self.model).__name__} has neither; set it to 0")
            head.register_forward_pre_hook(self._capture_head_input)
            self._bank = FeatureBank(cfg.contrastive_queue)

    def _capture_head_input(self, _module: nn.Module, args: tuple) -> None:
        if self.model.training:
            self._head_input = args[0]

    def _autocast(self):
        """The context forwards run in: bf16 autocast, or fp32 (on oneDNN's matmul where :attr:`linear_mode`)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        if self.linear_mode is not None:
            stack = contextlib.ExitStack()
            stack.enter_context(torch.autocast(device_type=self.device.type, enabled=False))
            stack.enter_context(self.linear_mode)
            return stack
        return torch.autocast(device_type=self.device.type, enabled=False)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _call(self, cb: str, *args) -> None:
        for c in self.callbacks:
            getattr(c, cb)(self, *args)

    def fit(self) -> TrainResult:
        start = self._fit_started = time.perf_counter()
        self._call("on_train_start", self.total_steps)
        first_epoch = self._resume["epoch"] if self._resume else 1
        for epoch in range(first_epoch, self.cfg.epochs + 1):
            self.epoch = epoch
            logs = self._train_epoch()
            if self.valid_loader is not None and len(self.valid_loader) > 0:
                logs.update({f"valid_{k}": v for k, v in self.evaluate(self.valid_loader).items()})
                if self.valid_metrics is not None:
                    self.model.eval()
                    with torch.inference_mode():
                        logs.update({f"valid_{k}": v for k, v in self.valid_metrics(self.model).items()})
            valid_loss = logs.get("valid_loss", logs["train_loss"])
            if self._improved(logs, valid_loss):
                self.result.best_valid_loss, self.result.best_epoch = valid_loss, epoch
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                self.epochs_since_best = 0
            else:
                self.epochs_since_best += 1
            logs["epoch"] = epoch
            logs["lr"] = self.scheduler.get_last_lr()[0]
            self.result.history.append(logs)
            self._call("on_epoch_end", epoch, logs)
            if self.should_stop or (self.cfg.max_steps and self.step >= self.cfg.max_steps):
                break
        self.result.steps = self.step
        self.result.seconds = self._seconds_before + time.perf_counter() - start
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self._call("on_train_end")
        return self.result

    def _improved(self, logs: dict[str, float], valid_loss: float) -> bool:
        """Whether this epoch beats the best so far on ``cfg.monitor`` (lower loss, higher chrF); records it.
        Without a validation figure for the monitor, the (validation or training) loss decides."""
        if self.cfg.monitor != "valid_loss" and self.cfg.monitor in logs:
            score = logs[self.cfg.monitor]
            better = self.result.best_score is None or score > self.result.best_score
        else:
            score = valid_loss
            better = valid_loss < self.result.best_valid_loss
        if better:
            self.result.best_score = score
        return better

    def _start_epoch(self) -> int:
        """Fix this epoch's data order; return how many batches were already trained (resume)."""
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: the order is a function of (seed, epoch)
            sampler.set_epoch(self.epoch)
        dataset = getattr(self.train_loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):  # train.subword_alpha: this epoch's segmentations, from (seed, epoch)
            dataset.set_epoch(self.epoch)
        gen = getattr(self.train_loader, "generator", None)
        resume, self._resume = self._resume, None
        if resume is not None:
            if resume.get("loader_generator") is not None and gen is not None:
                gen.set_state(resume["loader_generator"])
            self._epoch_acc = resume["acc"]
            skip = resume["batches_done"]
        else:
            self._epoch_acc = _fresh_acc()
            skip = 0
        # The loader draws its shuffle seed from this generator when iterated, so its state now
        # is what replays this epoch's order after a restart.
        self._epoch_loader_state = gen.get_state().clone() if gen is not None else None
        self.batches_done = skip
        return skip

    def _train_epoch(self) -> dict[str, float]:
        self.model.train()
        skip = self._start_epoch()
        resume_rng = self._pending_rng
        self._pending_rng = None
        acc = self._epoch_acc
        for i, batch in enumerate(self.train_loader):
            if i < skip:  # replaying the interrupted epoch's order up to where the checkpoint was taken
                continue
            if resume_rng is not None:
                # Restored only now: iterating the loader above must not disturb the dropout stream.
                _set_rng_state(resume_rng)
                resume_rng = None
            if self.cfg.max_steps and self.step >= self.cfg.max_steps:
                break
            batch = self._to_device(batch)
            outliers = batch.pop(OUTLIER_MASK, None)
            teacher = batch.pop(TEACHER_PROBS, None)
            if outliers is not None and bool(outliers.all()):
                batch.pop("labels", None)  # nothing labelled: the model's own loss would be a mean over no rows
            with self._autocast():
                out = self._train_model(**batch)
            if teacher is not None:
                out = self._add_distillation(out, teacher, outliers)
            if outliers is not None and bool(outliers.any()):
                out = self._add_outlier_exposure(out, outliers)
            if self._bank is not None and "labels" in batch:
                out = self._add_contrastive(out, batch["labels"])
            if out.loss is None:
                raise RuntimeError(f"{type(self.model).__name__} returned no loss; batches must carry labels")
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.batches_done = i + 1
            loss = float(out.loss.detach())
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {self.step}; lower train.lr")
            acc["loss"] += loss
            acc["batches"] += 1
            for k, v in out.losses.items():
                acc["parts"][k] = acc["parts"].get(k, 0.0) + float(v.detach())
            if "labels" in batch:
                c, n = _accuracy_counts(out.logits.detach(), batch["labels"])
                acc["correct"] += c
                acc["counted"] += n
            step_logs = {"loss": loss, "lr": self.scheduler.get_last_lr()[0]}
            self._call("on_step_end", self.step, step_logs)
            if self.cfg.max_steps and self.step >= self.cfg.max_steps:
                break
        if resume_rng is not None:  # the checkpoint was taken at the very end of the epoch
            _set_rng_state(resume_rng)
        acc = self._all_ranks(acc)
        n_batches = max(1, acc["batches"])
        logs = {"train_loss": acc["loss"] / n_batches}
        logs.update({f"train_{k}_loss": v / n_batches for k, v in acc["parts"].items()})
        if acc["counted"]:
            logs["train_accuracy"] = acc["correct"] / acc["counted"]
        return logs

    def _add_distillation(self, out, teacher: torch.Tensor, outliers: torch.Tensor | None):
        """Mix the distillation term into the model's own loss on the labelled rows: ``(1 - w) x own + w x KD``
        with ``w = train.distill_weight`` (outlier rows, if any, keep only their outlier-exposure term); logged as
        ``train_distillation_loss``."""
        rows = ~outliers if outliers is not None else None
        if rows is not None and not bool(rows.any()):
            return out
        logits = out.logits if rows is None else out.logits[rows]
        kd = distillation_loss(logits, teacher if rows is None else teacher[rows], self.cfg.distill_temperature)
        out.losses["distillation"] = kd
        w = self.cfg.distill_weight
        out.loss = w * kd if out.loss is None else (1.0 - w) * out.loss + w * kd
        return out

    def _add_outlier_exposure(self, out, outliers: torch.Tensor):
        """The outlier-exposure term on the flagged rows' logits (``train.outlier_weight`` times the cross-entropy
        to uniform), added to the model's own loss; logged as ``train_outlier_exposure_loss``."""
        oe = outlier_exposure_loss(out.logits[outliers])
        out.losses["outlier_exposure"] = oe
        weighted = self.cfg.outlier_weight * oe
        out.loss = weighted if out.loss is None else out.loss + weighted
        return out

    def _add_contrastive(self, out, labels: torch.Tensor):
        """The supervised contrastive term (``train.contrastive_weight`` x :func:`supervised_contrastive_loss`) on
        the labelled rows' head inputs, with the feature bank's rows as extra positives and negatives; then those
        rows join the bank. Logged as ``train_contrastive_loss``."""
        feats, self._head_input = self._head_input, None
        if feats is None or feats.dim() != 2 or labels.dim() != 1 or feats.size(0) != labels.size(0):
            got = None if feats is None else tuple(feats.shape)
            raise RuntimeError(f"train.contrastive_weight needs one feature vector per example at the head's input, "
                               f"shape (batch, features); {type(self.model).__name__} gave {got}")
        rows = labels != IGNORE_INDEX  # outlier-exposure rows carry no label
        f, y = feats[rows], labels[rows]
        loss = supervised_contrastive_loss(f, y, self.cfg.contrastive_temperature, self._bank.features,
                                           self._bank.labels)
        if self.cfg.contrastive_queue:
            self._bank.add(f, y)
        out.losses["contrastive"] = loss
        weighted = self.cfg.contrastive_weight * loss
        out.loss = weighted if out.loss is None else out.loss + weighted
        return out

    def _all_ranks(self, acc: dict[str, Any]) -> dict[str, Any]:
        """Under DDP, sum the epoch's counters over ranks so logs describe the global batch."""
        if self.distributed is None or not self.distributed.enabled:
            return acc

        parts = sorted(acc["parts"])  # same keys on every rank: the same model computes them
        vec = torch.tensor([acc["loss"], acc["batches"], acc["correct"], acc["counted"],
                            *(acc["parts"][k] for k in parts)], dtype=torch.float64, device=self.device)
        dist.all_reduce(vec)
        v = vec.tolist()
        return {"loss": v[0], "batches": int(v[1]), "correct": int(v[2]), "counted": int(v[3]),
                "parts": dict(zip(parts, v[4:], strict=True))}

    @torch.no_grad()
    def evaluate(self, loader: DataLoader) -> dict[str, float]:
        """Mean loss (weighted by counted targets when labels are token-level) and accuracy."""
        self.model.eval()
        tot_loss, n_batches, correct, counted = 0.0, 0, 0, 0
        for batch in loader:
            batch = self._to_device(batch)
            with self._autocast():
                out = self.model(**batch)
            tot_loss += float(out.loss)
            n_batches += 1
            if "labels" in batch:
                c, n = _accuracy_counts(out.logits, batch["labels"])
                correct, counted = correct + c, counted + n
        logs = {"loss": tot_loss / max(1, n_batches)}
        if counted:
            logs["accuracy"] = correct / counted
        return logs

    def snapshot(self) -> dict[str, torch.Tensor]:
        return copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here: tensors and plain values only (no pickle)."""
        sampler = getattr(self.train_loader, "sampler", None)
        return {
            "model": {k: v.detach() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _get_rng_state(),
            "position": {
                "epoch": self.epoch, "step": self.step, "batches_done": self.batches_done,
                "batches_per_epoch": len(self.train_loader),
                "sampler_seed": getattr(sampler, "seed", None),
                "loader_generator": self._epoch_loader_state,
            },
            "acc": copy.deepcopy(self._epoch_acc),
            "feature_bank": self._bank.state_dict() if self._bank is not None else {},
            "best": {
                "state": self.best_state, "epoch": self.result.best_epoch,
                "valid_loss": self.result.best_valid_loss, "epochs_since_best": self.epochs_since_best,
                "score": self.result.best_score,
            },
            "history": copy.deepcopy(self.result.history),
            "seconds": self._seconds_before + (time.perf_counter() - self._fit_started
                                               if self._fit_started is not None else 0.0),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next :meth:`fit` continues at the saved data position."""
        pos = state["position"]
        if pos["batches_per_epoch"] != len(self.train_loader):
            raise ValueError(
                f"checkpoint was taken with {pos['batches_per_epoch']} batches per epoch, this loader has "
                f"{len(self.train_loader)}; resume needs the same data, batch size and world size")
        seed = getattr(getattr(self.train_loader, "sampler", None), "seed", None)
        if pos.get("sampler_seed") != seed:
            raise ValueError(f"checkpoint sampler seed {pos.get('sampler_seed')} != loader's {seed}")
        self.model.load_state_dict(state["model"])
        if self._bank is not None:
            self._bank.load_state_dict(state.get("feature_bank") or {}, self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        best = state["best"]
        self.best_state = best["state"]
        self.result.best_epoch, self.result.best_valid_loss = best["epoch"], best["valid_loss"]
        self.result.best_score = best.get("score")  # absent in checkpoints written before train.monitor
        self.epochs_since_best = best["epochs_since_best"]
        self.result.history = list(state["history"])
        self.step, self.epoch = pos["step"], pos["epoch"]
        self._seconds_before = float(state.get("seconds", 0.0))
        self._resume = {"epoch": pos["epoch"], "batches_done": pos["batches_done"],
                        "loader_generator": pos.get("loader_generator"), "acc": state["acc"]}
        self._pending_rng = state["rng"]
        log.info("resuming at epoch %d, step %d (%d batch(es) into the epoch)",
                 self.epoch, self.step, pos["batches_done"])


def _fresh_acc() -> dict[str, Any]:
    return {"loss": 0.0, "batches": 0, "correct": 0, "counted": 0, "parts": {}}


def _get_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
