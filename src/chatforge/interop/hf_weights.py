"""Read an HF checkpoint folder's tensors without executing code, for every family's ``from_hf``.

The layouts ``save_pretrained`` writes: ``model.safetensors``, sharded ``model.safetensors.index.json`` +
``model-0000k-of-0000n.safetensors``, and the legacy ``pytorch_model.bin`` (and its sharded
``pytorch_model.bin.index.json``), loaded with ``weights_only=True`` so no pickled code runs. A damaged or
incomplete file (an interrupted download or copy) or a shard the index names but the folder lacks is a
:class:`~chatforge.interop.ConversionError` naming the file, never a library traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chatforge.interop import ConversionError

_SINGLE = ("model.safetensors", "pytorch_model.bin")
_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"{path} is missing (named in the checkpoint's index); copy the whole checkpoint folder")
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, IsADirectoryError) as e:  # other OSErrors: torch's reading of a truncated zip (EINVAL)
        raise ConversionError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # SafetensorError, UnpicklingError, RuntimeError (a truncated zip), EOFError ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path} is damaged or incomplete, or not a weights file ({first}); "
                              f"download or save the checkpoint again") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    return sd


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint folder ``src`` (one file, or every shard of its index)."""
    for name in _SINGLE:
        if (src / name).is_file():
            return _load_one(src / name)
    for name in _INDEX:
        index = src / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConversionError(f"{index} is not a checkpoint index with a weight_map ({e})") from None
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(_load_one(src / shard))
            return sd
    raise ConversionError(f"{src} has no weights: expected {', '.join(_SINGLE + _INDEX)}")
