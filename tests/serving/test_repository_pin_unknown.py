"""``--pin NAME=VERSION`` for a name the model directory does not hold is refused at startup.

It was ignored without a word: an operator rolling back with a typo (``--pin chatt=1``) got the latest version
of ``chat`` served and a server that looked healthy."""

from __future__ import annotations

import pytest

from chatforge.serving.repository import ModelDirectory


def test_a_pin_naming_no_model_is_refused_with_the_names_there_are(tmp_path):
    (tmp_path / "chat" / "1").mkdir(parents=True)
    (tmp_path / "chat" / "2").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"--pin names no model .*chatt; models: chat"):
        ModelDirectory(tmp_path, pins={"chatt": "1"}).resolve()
    assert ModelDirectory(tmp_path, pins={"chat": "1"}).resolve()["chat"][0] == "1"
