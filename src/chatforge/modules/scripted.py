"""What the scripted decoding steps of the families share (``chatforge.models.gpt.scripted``,
``chatforge.models.transformer.scripted``): a linear layer that repeats :class:`PackedLinear`'s choice of kernel
inside a TorchScript graph (and one for dynamically quantized int8 layers), the ``CHATFORGE_DECODE_STEP`` switch, and how a step is scripted and run.

Why a scripted step at all: served, a model's thread shares Python's GIL with the gRPC event loop; an eager step
gives the GIL up and takes it back around each torch op, and waits whenever the loop holds it, while TorchScript's
interpreter runs a whole graph with the GIL released (docs/architecture.md, "Served fp32 and int8 generators decode with a
TorchScript step").
"""

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatforge.modules.linear import PackedLinear

# ``CHATFORGE_DECODE_STEP``: ``auto`` (default) serves fp32 and int8 GPT and Transformer generators with their scripted
# step where the family's ``scriptable`` allows, ``eager`` never (the A/B switch of
# ``benchmarks/served_generation.py --eager-step``, and an operator's way back should a torch release change
# TorchScript).
DECODE_STEP_ENV = "CHATFORGE_DECODE_STEP"
DECODE_STEP_CHOICES = ("auto", "eager")


def decode_step_mode(environ=None) -> str:
    """``CHATFORGE_DECODE_STEP``, checked: ``auto`` or ``eager``."""
    env = os.environ if environ is None else environ
    choice = env.get(DECODE_STEP_ENV, "auto").strip().lower() or "auto"
    if choice not in DECODE_STEP_CHOICES:
        raise ValueError(f"{DECODE_STEP_ENV}={env.get(DECODE_STEP_ENV)!r} is not supported; allowed: "
                         f"{', '.join(DECODE_STEP_CHOICES)}")
    return choice


_NO_LIMIT = -1


def _no_scalars() -> list[int | float | complex | None]:
    """The op's empty ``Scalar?[]`` argument, typed as TorchScript's ``number``."""
    return []


class ScriptedLinear(nn.Module):
    """One linear layer: ``PackedLinear.fn``'s choice of kernel (its bounds on a call's elements, its one-row
    transposed copy), or ``F.linear`` for a plain ``nn.Linear``."""

    bias: Tensor | None
    packed: Tensor | None
    transposed: Tensor | None

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.weight = layer.weight.detach()
        self.bias = None if layer.bias is None else layer.bias.detach()
        self.width = int(layer.in_features)
        self.packed = None
        self.transposed = None
        self.least = 0
        self.most = _NO_LIMIT
        if isinstance(layer, PackedLinear):
            self.packed = layer.packed
            self.transposed = getattr(layer, "transposed", None)
            most = layer.most_elements
            self.least = layer.least_elements
            self.most = most if most is not None else _NO_LIMIT

    def forward(self, x: Tensor) -> Tensor:
        n = x.numel()
        transposed = self.transposed
        bias = self.bias
        if transposed is not None and n == self.width:  # one row
            row = x.reshape(1, self.width)
            if bias is None:
                y = torch.mm(row, transposed)
            else:
                y = torch.addmm(bias, row, transposed)
            shape = x.shape[:-1]
            shape.append(-1)
            return y.view(shape)
        packed = self.packed
        if packed is not None:
            if n >= self.least and (self.most < 0 or n <= self.most):
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", _no_scalars(), "")
        return F.linear(x, self.weight, bias)


class ScriptedInt8Linear(nn.Module):
    """One dynamically quantized int8 linear layer (``torch.ao.nn.quantized.dynamic.Linear``, and chatforge's
    full-range variant, ``inference.full_range_activations``): the op its ``forward`` calls, on its packed weights,
    with its choice of ``reduce_range``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.params = layer._packed_params._packed_params
        self.reduce_range = bool(int8_reduce_range(layer))

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.params, self.reduce_range)


def int8_reduce_range(layer: nn.Module) -> bool:
    """Whether ``layer``'s forward quantizes activations to 7 bits: torch's layers from version 4 on, unless the layer
    says otherwise (``reduce_range = False``: the full-range variant)."""
    own = getattr(type(layer), "reduce_range", None)
    if own is not None:
        return bool(own)
    return layer.version is not None and layer.version >= 4


def _int8_linear_type() -> type:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return DynamicLinear


def scripted_linear(layer: nn.Module) -> nn.Module:
    """The scripted stand-in for ``layer`` (see :func:`scriptable_linear`)."""
    return ScriptedInt8Linear(layer) if isinstance(layer, _int8_linear_type()) else ScriptedLinear(layer)


def scriptable_linear(layer: nn.Module) -> str | None:
    """None when :func:`scripted_linear` can stand for ``layer``, else why not: fp32 ``nn.Linear`` and
    ``PackedLinear`` on the CPU, and dynamically quantized int8 linear layers."""
    if isinstance(layer, _int8_linear_type()):
        if layer._packed_params.dtype != torch.qint8:
            return "its dynamically quantized layers are not int8"
        return None
    if type(layer) not in (nn.Linear, PackedLinear):
        return (f"it has {type(layer).__name__} layers (only nn.Linear, PackedLinear and dynamic int8 linear layers "
                "are scripted)")
    if layer.weight.dtype != torch.float32 or layer.weight.device.type != "cpu":
        return "its weights are not fp32 on the CPU"
    return None


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script(module)``, TorchScript's maintenance-mode warning silenced (this use is stable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module.eval())


def attach_scripted_step(model: nn.Module, scriptable: Callable[[nn.Module], str | None],
                         build: Callable[[nn.Module], torch.jit.ScriptModule], enable: bool = True) -> str | None:
    """A family's ``use_scripted_step``: store ``build(model)`` as ``model._scripted_step`` where ``scriptable(model)``
    has no objection (returns None), else leave None there and return the objection; a ``build`` that fails (this
    torch cannot compile the graph) is an objection too, so the model decodes eagerly and the caller logs why instead
    of failing to load. ``enable=False`` drops it. Set past ``nn.Module.__setattr__``, so the scripted module is no
    submodule: in no state_dict, moved by no ``.to()``."""
    object.__setattr__(model, "_scripted_step", None)
    if not enable:
        return None
    why = scriptable(model)
    if why is not None:
        return why
    try:
        scripted = build(model)
    except Exception as e:  # noqa: BLE001 - a torch build that cannot script this graph decodes eagerly
        # e.g. a build without oneDNN's linear op (the graph names it), or a TorchScript change in a later release
        return f"TorchScript could not compile its step ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
    object.__setattr__(model, "_scripted_step", scripted)
    return None


@contextlib.contextmanager
def plain_executor() -> Iterator[None]:
    """Run scripted steps on TorchScript's plain executor: the profiling one would respecialise the graph as a
    cache grows and fuses ops, which changes float rounding; the plain one runs the graph as written."""
    with torch.jit.optimized_execution(False):
        yield
