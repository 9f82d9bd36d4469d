"""The architecture's contracts: imports point down, the registry knows no family, config flows typed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def _run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_contracts_hold():
    """pyproject.toml's import-linter contracts (layers, independent families, no cycles) are kept."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([exe, "--no-cache"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_registry_imports_no_family_and_says_how_to_fill_it():
    """The registry sits at the bottom: importing it loads no family, and an empty registry says which
    module fills it (instead of importing the families itself)."""
    out = _run_python(
        "import sys\n"
        "from chatforge.registry import UnknownFamilyError, get_family\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('chatforge.models', 'chatforge.baselines',"
        " 'chatforge.families', 'chatforge.config', 'chatforge.bundle')))\n"
        "try:\n"
        "    get_family('transformer')\n"
        "    print(loaded, 'found')\n"
        "except UnknownFamilyError as e:\n"
        "    print(loaded, str(e))\n"
    )
    assert out.startswith("[] ")
    assert "unknown model family 'transformer'" in out and "import chatforge.families" in out


def test_families_module_registers_every_family_once():
    out = _run_python("import chatforge.families\nfrom chatforge.registry import families\nprint(','.join(families()))")
    assert out.split(",") == sorted(["bert", "bytenet", "elmo", "ensemble", "gpt", "linear", "retrieval", "transformer", "xgboost"])


def test_config_holds_the_typed_family_config_and_the_builder_gets_that_object():
    """Config flows one way: validated once into the family's config class, handed to the builder as is."""
    from chatforge.bundle import build_from_config
    from chatforge.config import validate_config
    from chatforge.models.transformer import TransformerConfig
    from chatforge.tokenizer import ByteTokenizer

    cfg = validate_config({"name": "t", "data": {"path": "sample"}, "tokenizer": {"kind": "byte"},
                           "model": {"family": "transformer", "task": "generation", "d_model": 32, "n_heads": 2,
                                     "num_encoder_layers": 1, "num_decoder_layers": 1, "d_ff": 64}})
    typed = cfg.model.family_config()
    assert isinstance(typed, TransformerConfig) and typed.d_model == 32
    assert cfg.model.family_config() is typed  # built once at validation, not rebuilt per call
    model = build_from_config(cfg, ByteTokenizer(), None)
    assert model.cfg is typed
    with pytest.raises(ValueError, match="frozen"):  # the keys cannot drift from the typed config they built
        cfg.model.d_model = 64
    assert cfg.to_dict()["model"] == {"family": "transformer", "task": "generation", "init_from": None,
                                      "d_model": 32, "n_heads": 2, "num_encoder_layers": 1,
                                      "num_decoder_layers": 1, "d_ff": 64}  # the YAML stays flat


def test_the_transformer_and_gpt_register_a_batched_decode_step():
    """Continuous batching asks the registry for a family's step model; serving holds no family code."""
    import chatforge.families  # noqa: F401
    from chatforge.models.gpt import GPTStepModel
    from chatforge.models.transformer import Seq2SeqStepModel
    from chatforge.registry import families, get_family

    steps = {name: get_family(name).step_model for name in families()}
    assert steps.pop("transformer") is Seq2SeqStepModel
    assert steps.pop("gpt") is GPTStepModel
    assert set(steps.values()) == {None}


def test_the_client_imports_no_torch():
    """``ChatbotClient`` (and the tools beside a server) start without torch or any model code."""
    out = _run_python("import importlib, sys\n"
                      "importlib.import_module('chatforge.client')\n"
                      "print('torch' in sys.modules, any(m.startswith('chatforge.models') for m in sys.modules))")
    assert out == "False False"
