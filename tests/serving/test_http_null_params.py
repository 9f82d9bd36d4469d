"""``null`` for an optional chat-completions field means its default, as in OpenAI's API.

OpenAI's schema marks ``n`` and ``stream`` nullable (default 1 and false), and clients that serialise every field of
a request object send them as ``null`` when unset; chatforge answered ``"stream": null`` with a 400 ("Input should be
a valid boolean") although it took ``null`` for every other optional field."""

from __future__ import annotations

import pytest

USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("field", ["n", "stream", "temperature", "top_p", "max_tokens", "stop", "seed",
                                   "stream_options", "user", "model", "presence_penalty", "frequency_penalty"])
def test_null_is_the_default_of_an_optional_field(served, field):
    st, http = served
    r = http.post("/v1/chat/completions", json={"messages": [USER], field: None})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and len(body["choices"]) == 1
    assert body["choices"][0]["message"]["content"] == "Hello there!"


def test_null_n_and_stream_together_give_one_whole_reply(served):
    st, http = served
    r = http.post("/v1/chat/completions", json={"messages": [USER], "n": None, "stream": None, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["choices"][0]["message"]["content"] == "Hello"


def test_a_value_of_the_wrong_type_is_still_refused(served):
    st, http = served
    for field, value in (("n", "1"), ("stream", "yes"), ("n", 2)):
        r = http.post("/v1/chat/completions", json={"messages": [USER], field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, value, r.text)
