"""`chatforge tokenizer train` on a corpus too small for any allowed vocabulary (one line): the error advised
"lower --vocab-size" to a size --vocab-size itself refuses (below its minimum of 16). It now says the corpus is too
small and names the way that works (--lower-if-too-large, or more text), which is checked to work."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.tokenizer import Tokenizer, VocabTooLargeError, load_tokenizer

MIN_VOCAB_SIZE = 16  # --vocab-size and tokenizer.vocab_size refuse less


@pytest.fixture
def one_line(tmp_path):
    (tmp_path / "one.csv").write_text("text\nhello world\n", encoding="utf-8")
    return tmp_path / "one.csv"


def test_the_error_names_a_way_that_works(tmp_path, one_line):
    r = CliRunner().invoke(app, ["tokenizer", "train", "--data", str(one_line), "--vocab-size", "16",
                                 "--out", str(tmp_path / "t.model")])
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    assert f"fewer than the smallest --vocab-size ({MIN_VOCAB_SIZE})" in out and "lower --vocab-size" not in out
    supported = int(out.split("supports only ")[1].split()[0])
    assert supported < MIN_VOCAB_SIZE
    # the way it names works ...
    r = CliRunner().invoke(app, ["tokenizer", "train", "--data", str(one_line), "--vocab-size", "16",
                                 "--lower-if-too-large", "--out", str(tmp_path / "t.model")])
    assert r.exit_code == 0, r.output
    assert load_tokenizer(tmp_path / "t.model").vocab_size == supported
    # ... and the one it used to name does not
    r = CliRunner().invoke(app, ["tokenizer", "train", "--data", str(one_line), "--vocab-size", str(supported),
                                 "--out", str(tmp_path / "u.model")])
    assert r.exit_code != 0


def test_the_library_error_does_not_advise_lowering_the_setting_below_its_minimum():
    with pytest.raises(VocabTooLargeError) as e:
        Tokenizer.train(["hello world"], vocab_size=16)
    assert "smallest tokenizer.vocab_size (16)" in str(e.value) and "Lower tokenizer.vocab_size" not in str(e.value)
