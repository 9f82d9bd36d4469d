"""`chatforge convert from-hf` on a GPT-2 folder whose config.json disagrees with its weights (an edited or mixed-up
config): one line naming the checkpoint tensor and both shapes, and never a bundle that silently leaves out blocks
the checkpoint has. No downloads: tiny random models."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.interop.test_hf_gpt import hf_checkpoint  # noqa: E402

from chatforge.cli import app  # noqa: E402


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("kind", ["gpt2", "openai-gpt"])
def test_a_size_that_disagrees_with_the_weights_names_the_tensor_and_both_shapes(tmp_path, kind):
    src, model = hf_checkpoint(tmp_path, kind)  # n_positions 48, n_embd 32: c_fc is (32, 128) in HF's Conv1D layout
    _edit_config(src, n_positions=64)
    r = CliRunner().invoke(app, ["convert", "from-hf", str(src), str(tmp_path / "bundle")])
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit), r.exception
    pos = "wpe.weight" if kind == "gpt2" else "positions_embed.weight"
    assert f"{pos}: shape (48, 32) in the checkpoint, (64, 32) expected" in r.output
    assert not (tmp_path / "bundle").exists()


def test_a_transposed_layer_is_named_in_the_checkpoints_own_layout(tmp_path):
    src, _ = hf_checkpoint(tmp_path, "gpt2")
    _edit_config(src, n_inner=64)
    r = CliRunner().invoke(app, ["convert", "from-hf", str(src), str(tmp_path / "bundle")])
    assert r.exit_code == 2, r.output
    assert "h.0.mlp.c_fc.weight: shape (32, 128) in the checkpoint, (32, 64) expected" in r.output


def test_fewer_layers_in_config_json_than_in_the_weights_is_refused_not_truncated(tmp_path):
    src, model = hf_checkpoint(tmp_path, "gpt2")
    assert model.config.n_layer == 2
    _edit_config(src, n_layer=1)
    r = CliRunner().invoke(app, ["convert", "from-hf", str(src), str(tmp_path / "bundle")])
    assert r.exit_code == 2, r.output
    assert "n_layer=1" in r.output and "h.1." in r.output
    assert not (tmp_path / "bundle").exists()
