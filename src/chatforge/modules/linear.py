"""Calling a linear layer on the inference fast paths, whatever its weights are stored as.

Decode steps call ``F.linear`` on a layer's weight and bias directly (no ``Module.__call__``: batch-1
decoding is bound by per-call overhead). A dynamically quantized layer (``inference.load_model(...,
precision="int8")``: ``torch.ao.nn.quantized.dynamic.Linear``) keeps its weight packed for the int8
kernels, where ``weight`` is a method returning a dequantized copy, so it must be called as a module. A
:class:`PackedLinear` (fp32 serving on CPUs where oneDNN's matmul is the faster one) is called through its ``fn``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def linear_fn(layer: nn.Module) -> Callable[[Tensor], Tensor]:
    """``x -> layer(x)``: ``F.linear`` on the float weights of an ``nn.Linear``, else the module itself."""
    if isinstance(layer, nn.Linear):
        return partial(F.linear, weight=layer.weight, bias=layer.bias)
    if isinstance(layer, PackedLinear):
        return layer.fn
    return layer


def apply_linear(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)``, without ``Module.__call__`` for a float ``nn.Linear``."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight, layer.bias)
    if isinstance(layer, PackedLinear):
        return layer.fn(x)
    return layer(x)


def _onednn_linear() -> Callable[..., Tensor] | None:
    """oneDNN's linear op on prepacked weights (``torch.ops.mkldnn._linear_pointwise``, what inductor calls on
    CPU), or None where this torch build has none or it fails on a probe."""
    try:
        op, reorder = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
        w = torch.ones(3, 2)
        y = op(torch.ones(1, 2), reorder(w, None), torch.zeros(3), "none", [], "")
        if not torch.equal(y, torch.full((1, 3), 2.0)):
            return None
    except (AttributeError, RuntimeError):
        return None
    return op


class PackPolicy(NamedTuple):
    """Which fp32 linear layers serving packs for oneDNN and which of their calls go to it (the others to
    ``F.linear``): layers of at least ``min_weights`` weights; calls of at least ``min_macs`` multiply-adds (rows x
    inputs x outputs) and at most ``max_rows`` rows (None: any)."""

    min_weights: int
    min_macs: int
    max_rows: int | None
    name: str
    # One-row calls (a decode step of one stream) of layers with at least as many outputs as inputs as
    # ``x @ W^T`` on a copy of the weight stored transposed (inputs x outputs): see PACK_AVX512.
    one_row_transposed: bool = False


# Measured on an AMD EPYC with AVX2 only (benchmarks/fp32_linear.py): oneDNN's call costs about 30 us more than
# torch's at batch 1 (a 128 x 128 layer: 37 against 5.5 us), so only layers whose matmul outlasts that gain, from a
# d_model-256 feed-forward layer's size up (256 x 1024: 0.74x at batch 1, 1.15x at 8; 256 x 8,000: 1.8x / 2.3x);
# packing every layer made the d128 Transformer decode 0.57x, packing these 1.04-1.06x and the d256 GPT 1.28x / 1.61x
# (batch 1 / 8). With hundreds of rows (32 texts of a BERT classifier) oneDNN ran 0.91x torch's there: calls of more
# than 64 rows stay on torch's.
PACK_AVX2 = PackPolicy(min_weights=256 * 1024, min_macs=0, max_rows=64, name="avx2")
# Measured on an AMD EPYC Zen 5 (AVX-512; oneMKL still takes its AVX2 path on AMD): oneDNN's call costs about 12 us
# more at batch 1 (128 x 128: 15 against 3 us; 256 x 1,024: 0.68x), breaks even near 1 M multiply-adds (128 x 128 at
# 64 rows, 1.0x) and then runs 1.6-3.6x torch's at any row count (256 x 1,024: 1.79x at 8 rows, 2.90x at 64, 2.34x
# at 512; 256 x 256 at 512 rows 2.21x): every layer of a d_model-128 model up, calls from 1 M multiply-adds.
# One row (a lone stream's decode step) is a matrix-vector product, bound by reading the weight: torch's F.linear
# (oneMKL) and oneDNN both read the weight as one dot product per output, which here streamed it well below the
# CPU's read bandwidth; ``x @ W^T`` on a copy stored transposed (inputs x outputs: each input times a contiguous row
# of outputs) reads it faster where outputs are at least as many as inputs (benchmarks/one_row_linear.py, Zen 4:
# 256 -> 8,000 1.46x the best of the two warm, 1.73x after other memory evicted it; 256 -> 256, 768, 1,024 and
# 768 -> 2,304, 3,072 1.1-2.0x) and slower where inputs outnumber outputs (1,024 -> 256, 3,072 -> 768: 0.74-0.84x),
# so only the former; a d_model-256 GPT's decode step 1.41x, the same greedy tokens.
PACK_AVX512 = PackPolicy(min_weights=128 * 128, min_macs=1 << 20, max_rows=None, name="avx512",
                         one_row_transposed=True)
# Kept for readers of the AVX2 figures above.
PACK_MIN_WEIGHTS, PACK_MAX_ROWS = PACK_AVX2.min_weights, PACK_AVX2.max_rows


def pack_policy(cpu_flags: set[str] | frozenset[str]) -> PackPolicy:
    """The :class:`PackPolicy` for a CPU with these ``/proc/cpuinfo`` flags: AVX-512 or AVX2 (oneDNN's kernels)."""
    return PACK_AVX512 if "avx512f" in cpu_flags else PACK_AVX2


class PackedLinear(nn.Module):
    """An fp32 ``nn.Linear`` for inference on CPU with its weight prepacked for oneDNN's matmul
    (``torch.ops.mkldnn._linear_pointwise``; :func:`pack_linear_layers`), used for the calls its
    :class:`PackPolicy` gives oneDNN (torch's ``F.linear`` for the others). ``weight``/``bias`` stay readable.

    Why: torch's CPU ``F.linear`` goes to oneMKL's sgemm, which on the AMD EPYCs measured here ran the large layers of
    a decode step (a 256 x 8,000 output layer: 230 against 127 us at batch 1 with AVX2, 124 against 63 on Zen 5) up to
    2.3-3.6x slower than oneDNN on the same weights (``benchmarks/fp32_linear.py``); the results differ by float
    rounding only (about 1e-6).
    """

    def __init__(self, layer: nn.Linear, op: Callable[..., Tensor], policy: PackPolicy = PACK_AVX2):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight, self.bias = layer.weight, layer.bias  # the originals: readers of .weight keep working
        self.policy = policy
        with torch.no_grad():
            self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None),
                                 persistent=False)
        packed, weight, bias = self.packed, layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        # Bounds on x.numel() (rows x inputs): at least min_macs multiply-adds, at most max_rows rows.
        least = -(-policy.min_macs // layer.out_features)  # multiply-adds = x.numel() x outputs
        most = policy.max_rows * layer.in_features if policy.max_rows is not None else None
        self.least_elements, self.most_elements = least, most  # read by modules.scripted.ScriptedLinear

        one_row = policy.one_row_transposed and layer.out_features >= layer.in_features
        if one_row:
            self.register_buffer("transposed", weight.t().contiguous(), persistent=False)  # inputs x outputs
        transposed, width = (self.transposed if one_row else None), layer.in_features

        def fn(x: Tensor) -> Tensor:
            n = x.numel()
            if n == width and transposed is not None:  # one row
                row = x.reshape(1, width)
                y = torch.mm(row, transposed) if bias is None else torch.addmm(bias, row, transposed)
                return y.view(*x.shape[:-1], -1)
            if n >= least and (most is None or n <= most):
                return op(x, packed, bias, "none", [], "")
            return F.linear(x, weight, bias)

        self.fn: Callable[[Tensor], Tensor] = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"oneDNN ({self.policy.name})" + (", one row on a transposed copy" if hasattr(self, "transposed") else ""))


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear op (and it passes a probe)."""
    return _onednn_linear() is not None


def pack_linear_layers(model: nn.Module, min_weights: int | None = None, policy: PackPolicy = PACK_AVX2) -> int:
    """Replace every fp32 CPU ``nn.Linear`` of ``model`` with at least ``policy.min_weights`` weights (or
    ``min_weights``) by a :class:`PackedLinear` under ``policy`` (for inference: the packed copy does not follow
    later changes to the weights); returns how many, 0 where oneDNN's op is unavailable."""
    op = _onednn_linear()
    if op is None:
        return 0
    least = policy.min_weights if min_weights is None else min_weights
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if (type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"
                    and child.weight.numel() >= least):
                setattr(module, name, PackedLinear(child, op, policy))
                n += 1
    return n


# ------------------------------------------------------------------ training
class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` whose three matmuls (forward, the input's and the weight's gradients) run on oneDNN's fp32
    matmul (``torch.ops.mkldnn._linear_pointwise`` on plain, possibly transposed, weights), the bias gradient a sum.

    oneDNN reads strided operands, so the backward's transposes are views, not copies."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, op: Callable[..., Tensor]) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = op(rows, weight, bias, "none", [], "")
        ctx.save_for_backward(rows, weight)
        ctx.op, ctx.shape, ctx.has_bias = op, x.shape, bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, weight = ctx.saved_tensors
        op = ctx.op
        g = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # (M, N) @ (N, K): a linear layer whose weight is W^T
            gx = op(g, weight.t(), None, "none", [], "").view(ctx.shape)
        if ctx.needs_input_grad[1]:  # (N, M) @ (M, K)
            gw = op(g.t(), rows.t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb, None


# A layer this small (rows x inputs x outputs multiply-adds) stays on torch's path: oneDNN's call costs more than
# it saves below it.
TRAIN_MIN_MACS = 1 << 23


class OneDNNTrainingLinear(torch.overrides.TorchFunctionMode):
    """Routes every fp32 CPU ``F.linear`` of at least ``min_macs`` multiply-adds called inside it (``nn.Linear``
    layers, tied output heads) through :class:`_OneDNNLinear`; anything else runs as it would. ``calls`` counts the
    routed calls."""

    def __init__(self, op: Callable[..., Tensor], min_macs: int = TRAIN_MIN_MACS):
        super().__init__()
        self.op, self.min_macs, self.calls = op, min_macs, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and weight.dim() == 2
                    and x.dim() >= 2 and (bias is None or bias.dtype == torch.float32)
                    and x.numel() * weight.shape[0] >= self.min_macs):
                self.calls += 1
                return _OneDNNLinear.apply(x, weight, bias, self.op)
        return func(*args, **kwargs)


def onednn_training_linear(min_macs: int = TRAIN_MIN_MACS) -> OneDNNTrainingLinear | None:
    """A :class:`OneDNNTrainingLinear` mode to run training forwards in, or None where this torch build has no
    oneDNN linear op."""
    op = _onednn_linear()
    return None if op is None else OneDNNTrainingLinear(op, min_macs)
