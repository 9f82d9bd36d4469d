"""A JSON body sent without a JSON Content-Type is refused with a message that says so.

``curl -d '{"messages": ...}' URL`` (curl's default Content-Type is application/x-www-form-urlencoded) got "the
request body is not a valid JSON object of this endpoint's schema: Input should be a valid dictionary or object":
the body was a valid JSON object of the schema, and nothing pointed at the header that was wrong."""

from __future__ import annotations

import json

import pytest

BODIES = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]}, "/v1/classify": {"text": "hi"}}


@pytest.mark.parametrize("path", sorted(BODIES))
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
def test_a_json_body_without_a_json_content_type_is_400_naming_the_header(served, path, content_type):
    st, http = served
    headers = {"content-type": content_type} if content_type else {}
    r = http.post(path, content=json.dumps(BODIES[path]).encode(), headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "body" and err["type"] == "invalid_request_error"
    assert "Content-Type" in err["message"] and "application/json" in err["message"], err["message"]
    assert "not a valid JSON object" not in err["message"]
    assert http.post(path, json=BODIES[path]).status_code == 200  # the same body, sent as JSON


def test_a_json_body_that_is_not_an_object_still_says_so(served):
    st, http = served
    r = http.post("/v1/chat/completions", content=b"[1]", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not a valid JSON object" in r.json()["error"]["message"]
