"""A method a path does not serve is 405 naming the methods it does serve, in the message and in ``Allow``.

The 405 said only "PUT /v1/models: Method Not Allowed", and its ``Allow`` header named the methods of the first
route matching the path, so ``/v1/models`` (GET, and HEAD served by a route of its own) said ``Allow: GET``."""

from __future__ import annotations

import pytest
from tests.serving_fakes import WAIT


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/v1/models", "GET, HEAD"),
    ("DELETE", "/v1/models/echo", "GET, HEAD"),
    ("POST", "/healthz", "GET, HEAD"),
    ("GET", "/v1/chat/completions", "POST"),
    ("PATCH", "/v1/classify", "POST"),
    ("POST", "/", "GET, HEAD"),
])
def test_405_names_the_allowed_methods(served, method, path, allowed):
    st, http = served
    r = http.request(method, path)
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == allowed
    err = r.json()["error"]
    assert err["message"] == f"{method} {path}: method not allowed; allowed: {allowed}"
    assert err["type"] == "invalid_request_error" and err["code"] == "405"
    assert http.get("/healthz", timeout=WAIT).status_code == 200
