"""Resumable checkpoints without pickle: tensors in safetensors, everything else as JSON.

A checkpoint is one file, ``<run>/checkpoints/last.safetensors``. Its tensors are the
model, optimizer moments, best weights and RNG states; its safetensors metadata holds
one JSON document with the rest (epoch, data position, scheduler, Python/NumPy RNG,
history) in which every tensor is replaced by a ``{"__t__": name}`` reference. Loading
therefore never executes code, unlike ``torch.save`` pickles. The file is written to a
temporary name, fsynced and renamed, so a SIGKILL at any moment leaves either the
previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chatforge.fileio import atomic_path
from chatforge.training.trainer import Callback

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.safetensors"
FORMAT = 1
_META_KEY = "chatforge_checkpoint"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or from an incompatible format."""


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """Replace tensors/arrays by references, keep JSON-able values, mark tuples and non-str keys."""
    if torch.is_tensor(obj):
        # clone: safetensors refuses tensors sharing storage (tied embeddings) and non-contiguous views.
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__t__": path}
    if isinstance(obj, np.ndarray):
        # Unsigned ints (NumPy's MT19937 key is uint32) travel as int64, which every reader supports.
        arr = obj.astype(np.int64) if obj.dtype.kind == "u" else obj
        tensors[path] = torch.from_numpy(np.ascontiguousarray(arr)).clone()
        return {"__np__": path, "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    raise CheckpointError(f"cannot store {type(obj).__name__} at {path!r} in a checkpoint; "
                          f"allowed: tensors, numpy arrays, dict, list, tuple, str, int, float, bool, None")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__t__" in obj:
            return tensors[obj["__t__"]]
        if "__np__" in obj:
            return tensors[obj["__np__"]].numpy().astype(np.dtype(obj["dtype"]))
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (nested dicts/lists of tensors and plain values) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": FORMAT, "state": _encode(state, tensors, "s")}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(doc)})
    log.debug("checkpoint written: %s (%d tensors)", path, len(tensors))
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; was the run started with "
                              f"train.checkpoint_every_steps set?")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"{path}: not a readable checkpoint: {e}") from None
    if _META_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file but not a chatforge checkpoint")
    doc = json.loads(meta[_META_KEY])
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {doc.get('format')!r}; this chatforge reads {FORMAT}")
    return _decode(doc["state"], tensors)


class CheckpointCallback(Callback):
    """Trainer callback: every ``every_steps`` optimizer steps, write the trainer's full state.

    Only the main process writes (DDP: rank 0); every rank holds the same state.
    """

    def __init__(self, run_dir: str | Path, every_steps: int, *, is_main: bool = True):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.path = checkpoint_path(run_dir)
        self.every_steps = every_steps
        self.is_main = is_main

    def on_step_end(self, trainer, step: int, logs: dict[str, float]) -> None:
        if self.is_main and step % self.every_steps == 0:
            save_checkpoint(self.path, trainer.state_dict())
