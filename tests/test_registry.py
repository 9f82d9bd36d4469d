"""The model-family registry on its own (an empty registry per test): register, look up, build."""

from dataclasses import dataclass

import pytest

from chatforge import registry
from chatforge.registry import (
    BuildContext,
    SpecialIds,
    UnknownFamilyError,
    build_model,
    get_family,
    register_family,
)


@dataclass
class ToyConfig:
    width: int = 2


@pytest.fixture(autouse=True)
def empty_registry(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", {})


def _ctx(task: str) -> BuildContext:
    return BuildContext(task=task, vocab_size=10, special=SpecialIds(pad=0, unk=1, bos=2, eos=3), num_labels=2)


def test_registered_family_builds_from_its_config_object():
    spec = register_family("toy", config_cls=ToyConfig, builder=lambda cfg, ctx: (cfg, ctx.task),
                           tasks=("classification",))
    assert get_family("toy") is spec and spec.kind == "torch" and spec.step_model is None
    cfg = ToyConfig(width=3)
    assert build_model("toy", cfg, _ctx("classification")) == (cfg, "classification")
    assert registry.families() == ["toy"]


def test_duplicate_name_is_refused():
    register_family("toy", config_cls=ToyConfig, builder=lambda cfg, ctx: None, tasks=("lm",))
    with pytest.raises(ValueError, match="model family 'toy' is already registered"):
        register_family("toy", config_cls=ToyConfig, builder=lambda cfg, ctx: None, tasks=("lm",))


def test_unknown_family_lists_the_known_ones():
    register_family("toy", config_cls=ToyConfig, builder=lambda cfg, ctx: None, tasks=("lm",))
    register_family("alpha", config_cls=ToyConfig, builder=lambda cfg, ctx: None, tasks=("lm",))
    with pytest.raises(UnknownFamilyError) as err:
        get_family("nope")
    assert str(err.value) == "unknown model family 'nope'; known families: alpha, toy"


def test_build_refuses_an_unsupported_task_and_an_untyped_config():
    register_family("toy", config_cls=ToyConfig, builder=lambda cfg, ctx: "built", tasks=("lm", "generation"))
    with pytest.raises(ValueError, match="'toy' does not support task 'classification'; supported: lm, generation"):
        build_model("toy", ToyConfig(), _ctx("classification"))
    with pytest.raises(TypeError, match="built from a ToyConfig, not dict"):
        build_model("toy", {"width": 2}, _ctx("lm"))
