"""`chatforge convert from-hf BERT_DIR OUT --task ...` ended in a TypeError traceback (the BERT converter took no
task). A BERT checkpoint's task follows its architecture: the same task is accepted, another is refused in one line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.interop.test_hf_bert import VOCAB, _hf_config, _randomise  # noqa: E402

from chatforge.bundle import load_bundle  # noqa: E402
from chatforge.cli import app  # noqa: E402


@pytest.fixture
def classifier_dir(tmp_path):
    src = tmp_path / "hf-cls"
    _randomise(transformers.BertForSequenceClassification(_hf_config(num_labels=3))).save_pretrained(src)
    (src / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return src


def test_the_architectures_own_task_is_accepted(tmp_path, classifier_dir):
    r = CliRunner().invoke(app, ["convert", "from-hf", str(classifier_dir), str(tmp_path / "b"),
                                 "--task", "classification"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert load_bundle(tmp_path / "b").task == "classification"


def test_another_task_is_refused_in_one_line(tmp_path, classifier_dir):
    r = CliRunner().invoke(app, ["convert", "from-hf", str(classifier_dir), str(tmp_path / "b"), "--task", "mlm"])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "task='mlm': a BERT checkpoint's task follows its architecture" in " ".join(r.output.split())
    assert not (tmp_path / "b").exists()
