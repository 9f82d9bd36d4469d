"""Model-family registry: the YAML ``model.family`` name -> its typed config class, builder and tasks.

Families register themselves in their package's ``__init__`` and are imported in one place,
:mod:`chatforge.families` (fairseq's registry, without import-time magic): the registry imports
nothing above the tokenizer, and whoever needs the families (config loading, bundle loading,
the CLI) imports ``chatforge.families``. A duplicate name raises; an unknown name fails with
the list of known ones.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatforge.tokenizer import SpecialIds

__all__ = [
    "BuildContext",
    "FamilySpec",
    "OPTIONAL_MODULES",
    "SpecialIds",  # re-exported: the tokenizer owns the special-token contract
    "UnknownFamilyError",
    "build_model",
    "families",
    "get_family",
    "install_hint",
    "missing_modules",
    "register_family",
]

# What a family's bundles may import beyond ``chatforge[serve]``: import name -> (distribution, chatforge extra).
# The serving image installs ``serve`` only by default, so a bundle whose family needs one of these is refused at load
# with :func:`install_hint`'s message instead of failing on an import, at load or at its first request.
OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "estimators"),
    "scipy": ("scipy", "estimators"),
    "xgboost": ("xgboost-cpu", "estimators"),
    "faiss": ("faiss-cpu", "estimators"),
}


def missing_modules(names: Iterable[str]) -> list[str]:
    """The import names among ``names`` this installation cannot import (found without importing them)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found:
            missing.append(name)
    return missing


def install_hint(modules: Iterable[str]) -> str:
    """What to install for ``modules`` (import names of :data:`OPTIONAL_MODULES`): the packages, the pip command
    and the serving image's build argument."""
    modules = list(dict.fromkeys(modules))
    dists = ", ".join(OPTIONAL_MODULES[m][0] if m in OPTIONAL_MODULES else m for m in modules)
    extras = sorted({OPTIONAL_MODULES[m][1] for m in modules if m in OPTIONAL_MODULES}) or ["estimators"]
    extra = ",".join(extras)
    return (f"{dists}, which this installation lacks: pip install 'chatforge[{extra}]' (the serving image: build it "
            f"with --build-arg EXTRAS=serve,postgres,{extra})")


@dataclass(frozen=True)
class BuildContext:
    """What a builder needs besides the family's own config."""

    task: str
    vocab_size: int
    special: SpecialIds
    num_labels: int | None = None
    tokenizer: Any = None  # for families that need more than ids (ELMo spells pieces into characters)
    # Loads another bundle as a classifier (ensembles combine bundles); given by whoever loads or trains
    # bundles (chatforge.bundle), so no family imports the bundle layer.
    load_classifier: Callable[[Path], Any] | None = None


@dataclass(frozen=True)
class FamilySpec:
    name: str
    config_cls: type
    builder: Callable[[Any, BuildContext], Any]
    tasks: tuple[str, ...]
    kind: str = "torch"  # "torch" models are nn.Modules trained by the Trainer; others fit themselves
    # model -> chatforge.decoding.StepModel: the row-wise decode step continuous batching drives;
    # None: the family is served one request per thread (ReplyGenerator.stream).
    step_model: Callable[[Any], Any] | None = None
    # config -> import names its bundles need beyond chatforge[serve] (keys of OPTIONAL_MODULES), checked when a
    # bundle loads (chatforge.bundle), so a server without them refuses the bundle naming the extra to install.
    requires: Callable[[Any], tuple[str, ...]] | None = None

    def required_modules(self, config: Any) -> tuple[str, ...]:
        return tuple(self.requires(config)) if self.requires is not None else ()


_FAMILIES: dict[str, FamilySpec] = {}


class UnknownFamilyError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def register_family(name: str, *, config_cls: type, builder: Callable[[Any, BuildContext], Any],
                    tasks: tuple[str, ...], kind: str = "torch",
                    step_model: Callable[[Any], Any] | None = None,
                    requires: Callable[[Any], tuple[str, ...]] | None = None) -> FamilySpec:
    """Register ``builder(config: config_cls, ctx) -> model`` under ``name`` (from the family's ``__init__``);
    ``requires(config)``: the optional modules (:data:`OPTIONAL_MODULES`) its bundles need to load and serve."""
    if name in _FAMILIES:
        raise ValueError(f"model family {name!r} is already registered")
    spec = FamilySpec(name, config_cls, builder, tuple(tasks), kind, step_model, requires)
    _FAMILIES[name] = spec
    return spec


def get_family(name: str) -> FamilySpec:
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES)) or "none registered (import chatforge.families first)"
        raise UnknownFamilyError(f"unknown model family {name!r}; known families: {known}") from None


def families() -> list[str]:
    return sorted(_FAMILIES)


def build_model(family: str, config: Any, ctx: BuildContext):
    """Build ``family`` for ``ctx.task``; ``config`` is exactly the family's config class (validated at load)."""
    spec = get_family(family)
    if ctx.task not in spec.tasks:
        raise ValueError(
            f"model family {family!r} does not support task {ctx.task!r}; supported: {', '.join(spec.tasks)}"
        )
    if not isinstance(config, spec.config_cls):
        raise TypeError(f"model family {family!r} is built from a {spec.config_cls.__name__}, "
                        f"not {type(config).__name__}; validate the config first (chatforge.config)")
    return spec.builder(config, ctx)
