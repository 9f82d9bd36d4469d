"""Result types shared by the model side and the client side, with no torch/numpy imports.

The gRPC client (``client/channel.py``) returns :class:`ClassPrediction` too; defining it here
instead of in ``inference.py`` (which imports ``decoding`` and so torch) keeps
``chatforge health`` and the other client commands free of torch's ~3 s import.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ClassPrediction:
    label: str
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    out_of_scope: bool = False
