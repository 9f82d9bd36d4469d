"""A refused parameter's value is shown by its start, without serialising all of it.

``check_supported`` wrote the whole value as JSON to show its first 80 characters: a 4 MiB ``logit_bias`` of 300,000
keys cost 0.2 s of the event loop both surfaces share, on top of parsing it, for one 400."""

from __future__ import annotations

import json

import pytest

from chatforge.serving import http as http_module
from chatforge.serving.http import FieldError, check_supported, parse_chat_request


@pytest.mark.parametrize(("name", "value"), [
    ("logit_bias", {str(i): 0 for i in range(100_000)}),
    ("tools", [{"type": "function"}] * 100_000),
])
def test_a_large_refused_value_is_not_serialised_whole(monkeypatch, name, value):
    written: list[int] = []
    dumps = json.dumps

    def counting(obj, **kw):
        out = dumps(obj, **kw)
        written.append(len(out))
        return out

    req = parse_chat_request(json.dumps({"messages": [{"role": "user", "content": "a"}], name: value}).encode(),
                             "application/json")
    monkeypatch.setattr(http_module.json, "dumps", counting)
    with pytest.raises(FieldError) as info:
        check_supported(req)
    monkeypatch.undo()
    assert info.value.param == name
    shown = str(info.value).split(" is not supported")[0].removeprefix(f"{name}=")
    assert shown == dumps(value)[:80]  # the same start as before
    assert max(written) < 10_000, "the whole value was serialised"
