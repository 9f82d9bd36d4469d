"""A body that is not UTF-8 gets its 400 with the request id the server logged it under.

Every other answer of /v1/chat/completions and /v1/classify carries ``X-Request-Id`` (the id in the server's log line
of the call); this one did not, though the server logged the call (400) under that id, so the client had nothing to
give the operator to find it."""

from __future__ import annotations

import gzip
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


@pytest.mark.parametrize("path", sorted(RAW))
@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_a_body_that_is_not_utf8_gets_a_400_saying_so(served, path, encoding):
    """FastAPI's answer, "There was an error parsing the body", named neither the cause nor what is allowed: a client
    that sent Latin-1 text, or compressed its body, could not tell what to change."""
    st, http = served
    raw = RAW[path] if encoding is None else gzip.compress(RAW[path].decode("latin-1").encode())
    headers = {"content-type": "application/json", **({"content-encoding": encoding} if encoding else {})}
    r = http.post(path, content=raw, headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "body" and err["type"] == "invalid_request_error"
    assert "not UTF-8" in err["message"] and "Content-Encoding" in err["message"]
    assert "allowed: a JSON body in UTF-8, not compressed" in err["message"]
    assert http.get("/healthz").status_code == 200
