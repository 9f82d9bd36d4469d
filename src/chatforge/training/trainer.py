"""A family-agnostic trainer.

It knows nothing of model families: it moves a batch (a dict of tensors) to the
device, calls ``model(**batch)``, reads ``output.loss`` (and ``output.losses`` for
the parts), steps AdamW with warmup + decay and gradient clipping, validates each
epoch, keeps the best weights, and reports through callbacks.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from chatforge.config import TrainConfig
from chatforge.training.schedules import build_scheduler
from chatforge.training.tasks import IGNORE_INDEX

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
            log.info("early stopping: no improvement of valid_loss for %d epoch(s)", self.patience)
            trainer.should_stop = True


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_valid_loss: float = math.inf
    steps: int = 0
    seconds: float = 0.0


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
    ):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.model = model.to(self.device)
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

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _call(self, cb: str, *args) -> None:
        for c in self.callbacks:
            getattr(c, cb)(self, *args)

    def fit(self) -> TrainResult:
        start = time.perf_counter()
        self._call("on_train_start", self.total_steps)
        for epoch in range(1, self.cfg.epochs + 1):
            self.epoch = epoch
            logs = self._train_epoch()
            if self.valid_loader is not None and len(self.valid_loader) > 0:
                logs.update({f"valid_{k}": v for k, v in self.evaluate(self.valid_loader).items()})
            valid_loss = logs.get("valid_loss", logs["train_loss"])
            if valid_loss < self.result.best_valid_loss:
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
        self.result.seconds = time.perf_counter() - start
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self._call("on_train_end")
        return self.result

    def _train_epoch(self) -> dict[str, float]:
        self.model.train()
        tot_loss, n_batches, correct, counted = 0.0, 0, 0, 0
        parts: dict[str, float] = {}
        for batch in self.train_loader:
            batch = self._to_device(batch)
            with self._autocast():
                out = self.model(**batch)
            if out.loss is None:
                raise RuntimeError(f"{type(self.model).__name__} returned no loss; batches must carry labels")
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            loss = float(out.loss.detach())
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {self.step}; lower train.lr")
            tot_loss += loss
            n_batches += 1
            for k, v in out.losses.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach())
            if "labels" in batch:
                c, n = _accuracy_counts(out.logits.detach(), batch["labels"])
                correct, counted = correct + c, counted + n
            step_logs = {"loss": loss, "lr": self.scheduler.get_last_lr()[0]}
            self._call("on_step_end", self.step, step_logs)
            if self.cfg.max_steps and self.step >= self.cfg.max_steps:
                break
        logs = {"train_loss": tot_loss / max(1, n_batches)}
        logs.update({f"train_{k}_loss": v / max(1, n_batches) for k, v in parts.items()})
        if counted:
            logs["train_accuracy"] = correct / counted
        return logs

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
