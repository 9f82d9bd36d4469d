"""Model-family registry: the YAML ``model.family`` name -> its config class and builder.

Families register themselves by explicit import in ``chatforge.models`` (fairseq's
registry, without import-time magic elsewhere). A duplicate name raises; an unknown
name fails with the list of known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SpecialIds:
    """The special-token contract, read from the tokenizer (never from literals)."""

    pad: int = 0
    bos: int = 1
    eos: int = 2
    unk: int = 3
    cls: int | None = None
    sep: int | None = None
    mask: int | None = None


@dataclass(frozen=True)
class BuildContext:
    """What a builder needs besides the family's own config."""

    task: str
    vocab_size: int
    special: SpecialIds
    num_labels: int | None = None
    tokenizer: Any = None  # for families that need more than ids (ELMo spells pieces into characters)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    config_cls: type
    builder: Callable[[Any, BuildContext], Any]
    tasks: tuple[str, ...]
    kind: str = "torch"  # "torch" models are nn.Modules trained by the Trainer; others fit themselves


_FAMILIES: dict[str, FamilySpec] = {}


class UnknownFamilyError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def register_family(name: str, config_cls: type, tasks: tuple[str, ...], kind: str = "torch"):
    """Decorator registering ``builder(config, ctx) -> model`` under ``name``."""

    def deco(builder: Callable[[Any, BuildContext], Any]):
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} is already registered")
        _FAMILIES[name] = FamilySpec(name, config_cls, builder, tuple(tasks), kind)
        return builder

    return deco


def _ensure_loaded() -> None:
    import chatforge.families  # noqa: F401


def get_family(name: str) -> FamilySpec:
    _ensure_loaded()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(
            f"unknown model family {name!r}; known families: {', '.join(sorted(_FAMILIES))}"
        ) from None


def families() -> list[str]:
    _ensure_loaded()
    return sorted(_FAMILIES)


def build_model(family: str, config: Any, ctx: BuildContext):
    spec = get_family(family)
    if ctx.task not in spec.tasks:
        raise ValueError(
            f"model family {family!r} does not support task {ctx.task!r}; supported: {', '.join(spec.tasks)}"
        )
    return spec.builder(config, ctx)
