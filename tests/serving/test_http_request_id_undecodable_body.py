"""A body that is not UTF-8 gets its 400 with the request id the server logged it under.

Every other answer of /v1/chat/completions and /v1/classify carries ``X-Request-Id`` (the id in the server's log line
of the call); this one did not, though the server logged the call (400) under that id, so the client had nothing to
give the operator to find it."""

from __future__ import annotations

import logging

import pytest

RAW = {"/v1/chat/completions": b'{"messages":[{"role":"user","content":"\xe9t\xe9"}]}',
       "/v1/classify": b'{"text":"\xe9t\xe9"}'}


@pytest.mark.parametrize("path", sorted(RAW))
@pytest.mark.parametrize("sent", ["client-chosen-id-1", None])
def test_a_body_that_is_not_utf8_gets_400_with_the_logged_request_id(served, caplog, path, sent):
    caplog.set_level(logging.INFO)
    st, http = served
    headers = {"content-type": "application/json", **({"x-request-id": sent} if sent else {})}
    r = http.post(path, content=RAW[path], headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    logged = [rec for rec in caplog.records if getattr(rec, "rpc", None) == path]
    assert [rec.http_status for rec in logged] == [400]
    assert r.headers.get("x-request-id") == logged[0].request_id
    if sent:
        assert logged[0].request_id == sent
