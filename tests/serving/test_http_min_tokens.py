"""A ``min_tokens`` above the reply's token limit is refused in the request's own terms.

The 400 said "min_new_tokens=100 is out of range; allowed: an integer in [0, max_new_tokens]": names this API does
not have (it has min_tokens and max_tokens / max_completion_tokens), and not the limit itself, which a client that
sent no max_tokens cannot know (the server's default, 64)."""

from __future__ import annotations

import pytest

USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(("limit", "want"), [
    ({}, "min_tokens=100 is out of range; allowed: at most max_tokens, 64 (the default; send max_tokens to raise it)"),
    ({"max_tokens": 50}, "min_tokens=100 is out of range; allowed: at most max_tokens, 50"),
    ({"max_completion_tokens": 50}, "min_tokens=100 is out of range; allowed: at most max_completion_tokens, 50"),
])
def test_min_tokens_over_the_limit_names_the_limit(served, limit, want):
    st, http = served
    r = http.post("/v1/chat/completions", json={"messages": [USER], "min_tokens": 100, **limit})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["message"]) == ("min_tokens", want)


def test_min_tokens_up_to_the_limit_is_accepted(served):
    st, http = served
    r = http.post("/v1/chat/completions", json={"messages": [USER], "min_tokens": 3, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
