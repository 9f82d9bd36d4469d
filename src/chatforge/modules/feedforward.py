"""Position-wise feed-forward network (Vaswani et al. 2017, section 3.3)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

# "gelu" is the exact erf form (BERT, OpenAI GPT); "gelu_tanh" the tanh approximation GPT-2 uses
# ("gelu_new" in HF), here one fused kernel instead of HF's chain of elementwise ops.
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


def make_activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation={name!r} is not supported; allowed: {', '.join(_ACTIVATIONS)}") from None


class FeedForward(nn.Module):
    """FFN(x) = W2 · dropout(act(W1 x + b1)) + b2, applied to every position independently.

    Attribute names (``linear1``, ``linear2``) follow ``torch.nn.TransformerEncoderLayer`` so that
    weights map one to one.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0,
                 activation: Literal["relu", "gelu", "gelu_tanh"] = "relu", bias: bool = True):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.activation = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))  # (B, T, D)
