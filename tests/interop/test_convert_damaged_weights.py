"""`chatforge convert from-hf` on checkpoint folders whose weights are damaged (an interrupted download or copy), not
weights at all, or sharded as `save_pretrained(max_shard_size=...)` writes bigger models: a one-line error naming
the file, or a working conversion; never a safetensors/torch traceback. No downloads: tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.interop.test_hf_bert import VOCAB, _hf_config, _randomise  # noqa: E402
from tests.interop.test_hf_gpt import hf_checkpoint  # noqa: E402

from chatforge.bundle import load_bundle  # noqa: E402
from chatforge.cli import app  # noqa: E402
from chatforge.interop import from_hf  # noqa: E402


def _checkpoint(tmp_path, family, safe=True):
    if family == "bert":
        src = tmp_path / "hf-bert"
        model = _randomise(transformers.BertForSequenceClassification(_hf_config(num_labels=3)))
        model.save_pretrained(src)
        (src / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    else:
        src, model = hf_checkpoint(tmp_path, "gpt2")
    if not safe:  # the legacy layout (transformers 5 writes safetensors whatever safe_serialization says)
        (src / "model.safetensors").unlink()
        torch.save(model.state_dict(), src / "pytorch_model.bin")
    return src


def _convert(src, out):
    return CliRunner().invoke(app, ["convert", "from-hf", str(src), str(out)])


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_a_truncated_weights_file_is_named_in_one_line(tmp_path, family, safe):
    src = _checkpoint(tmp_path, family, safe)
    weights = src / ("model.safetensors" if safe else "pytorch_model.bin")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])  # what an interrupted download leaves
    r = _convert(src, tmp_path / "bundle")
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit), r.exception  # _fail's exit, not a library error
    assert weights.name in r.output and "damaged or incomplete" in r.output
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_a_pytorch_bin_that_is_not_a_state_dict_is_named(tmp_path, family):
    src = _checkpoint(tmp_path, family, safe=True)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_text("<html>404 Not Found</html>\n")  # a failed download saved as the file
    r = _convert(src, tmp_path / "bundle")
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit), r.exception
    assert "pytorch_model.bin" in r.output and "damaged or incomplete" in r.output


def test_a_sharded_gpt2_checkpoint_converts_with_every_tensor(tmp_path):
    src, model = hf_checkpoint(tmp_path, "gpt2")
    (src / "model.safetensors").unlink()
    model.save_pretrained(src, max_shard_size="20KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    out = from_hf(src, tmp_path / "bundle")
    b = load_bundle(out)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = model(ids).logits
        got = b.model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_shard_the_index_names_but_the_folder_lacks_is_named(tmp_path):
    src, model = hf_checkpoint(tmp_path, "gpt2")
    (src / "model.safetensors").unlink()
    model.save_pretrained(src, max_shard_size="20KB")
    shard = sorted(set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values()))[-1]
    (src / shard).unlink()
    r = _convert(src, tmp_path / "bundle")
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit), r.exception
    assert shard in r.output and "missing" in r.output
