"""The content parts of a request's messages are bounded in all (400 naming ``messages`` and the limit).

Each part is validated in Python on the event loop both surfaces share (about 10 us apiece): a 4 MiB body of
150,000 empty text parts held the loop for 1.6 s per request, 12 times what parsing its JSON took, so one client
sending such bodies stalled every stream on the server, gRPC's too."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError

from chatforge.serving.http import parse_chat_request

MAX_CONTENT_PARTS = 1000  # serving.http.MAX_CONTENT_PARTS, as documented in README.md


def _body(parts_per_message: list[int]) -> dict:
    messages = []
    for n in parts_per_message:
        messages.append({"role": "user", "content": [{"type": "text", "text": ""}] * (n - 1)
                         + [{"type": "text", "text": "a"}]})
    return {"messages": messages}


def test_more_content_parts_than_allowed_is_400_naming_messages_and_the_limit(served):
    st, http = served
    for split in ([MAX_CONTENT_PARTS + 1], [MAX_CONTENT_PARTS // 2, MAX_CONTENT_PARTS // 2 + 1]):
        r = http.post("/v1/chat/completions", json=_body(split))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages"
        assert f"{MAX_CONTENT_PARTS + 1} content parts in all; allowed: at most {MAX_CONTENT_PARTS}" in err["message"]
    ok = http.post("/v1/chat/completions", json=_body([MAX_CONTENT_PARTS // 2, MAX_CONTENT_PARTS // 2]))
    assert ok.status_code == 200, ok.text


def test_a_body_of_many_parts_is_refused_by_their_count():
    """Refused by the count, taken before any part is validated (a "before" validator of ``messages``)."""
    with pytest.raises(RequestValidationError) as info:
        parse_chat_request(json.dumps(_body([150_000])).encode(), "application/json")
    assert "150000 content parts in all" in info.value.errors()[0]["msg"]
