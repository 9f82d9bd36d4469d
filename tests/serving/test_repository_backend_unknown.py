"""``--backend NAME=BACKEND`` for a name the model directory does not hold is refused at startup, as it is beside
``--model`` and as ``--pin`` is.

With ``--model-dir`` it was ignored without a word: ``--backend chatt=ctranslate2`` (a typo) served ``chat`` with
torch and a server that looked configured."""

from __future__ import annotations

import pytest

from chatforge.serving.repository import ModelDirectory


def test_a_backend_naming_no_model_is_refused_with_the_names_there_are(tmp_path):
    (tmp_path / "chat" / "1").mkdir(parents=True)
    (tmp_path / "intent" / "1").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"--backend names no model under .*: chatt; models: chat, intent"):
        ModelDirectory(tmp_path, backends={"chatt": "ctranslate2"}).resolve()
    assert set(ModelDirectory(tmp_path, backends={"chat": "torch"}).resolve()) == {"chat", "intent"}
