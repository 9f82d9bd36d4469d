"""A lone surrogate quoted back in an error message is escaped, not a 500.

An unsupported parameter's value is shown in its 400 (``tool_choice="..." is not supported``). JSON lets a client
send a lone surrogate (``"\\ud800"``), which no UTF-8 response can carry: the error body failed to encode, and the
client got a bare ``500 Internal Server Error`` (text/plain, not the API's error object) and a traceback in the log
for a request that was simply invalid."""

from __future__ import annotations

import logging

import httpx
import pytest
from tests.serving.conftest import base_url
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.serving.http import FieldError, error_body


@pytest.mark.parametrize(("extra", "param"), [
    ('"tool_choice":"\\ud800"', "tool_choice"),
    ('"logit_bias":{"\\ud800":1}', "logit_bias"),
    ('"response_format":{"type":"\\udfff x"}', "response_format"),
])
@pytest.mark.parametrize("stream", ["false", "true"])
def test_a_lone_surrogate_in_an_unsupported_parameter_is_400_naming_it(caplog, extra, param, stream):
    caplog.set_level(logging.INFO)
    body = '{"messages":[{"role":"user","content":"a"}],"stream":' + stream + ',' + extra + '}'
    with ServerThread(make_engine(), http_port=0) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            r = http.post("/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == param and "is not supported" in err["message"]
            assert "\\ud800" in err["message"] or "\\udfff" in err["message"]  # shown escaped
            # the server keeps serving
            ok = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]})
            assert ok.status_code == 200
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


def test_every_error_body_can_be_sent_as_utf8():
    _, body = error_body(FieldError("x\udc80", "x\udc80='\ud800 \u00e9' is bad"), "rid")
    assert body["error"]["message"] == "x\\udc80='\\ud800 \u00e9' is bad"  # other characters kept as they are
    assert body["error"]["param"] == "x\\udc80"
