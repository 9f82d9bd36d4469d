"""`stream_options` without `stream: true` is a 400 naming it, as OpenAI's API answers; it was accepted silently, so a
client asking for a usage chunk on a non-streamed call believed it would get one."""

from __future__ import annotations

import pytest

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("stream", [False, None, "absent"])
def test_stream_options_without_stream_is_400(served, stream):
    _, http = served
    body = {"model": "echo", "messages": MESSAGES, "stream_options": {"include_usage": True}}
    if stream != "absent":
        body["stream"] = stream
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "stream_options" and "only allowed when stream is true" in err["message"], err


def test_stream_options_with_stream_still_streams_the_usage(served):
    _, http = served
    r = http.post("/v1/chat/completions", json={"model": "echo", "messages": MESSAGES, "stream": True,
                                                "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and '"usage"' in r.text and r.text.rstrip().endswith("data: [DONE]"), r.text
