"""A non-ASCII X-Session-Id is read as the UTF-8 the client sent (HTTP hands header bytes over as latin-1, so "세션"
was stored as "ì\\x84¸ì\\x85\\x98" and the same id sent as `user` in the body became another conversation); bytes
that are not UTF-8 are a 400 naming the header, and an error about `user` names `user`, not the header."""

from __future__ import annotations

import httpx
from tests.serving.conftest import base_url
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.serving.store import ConversationStore

BODY = {"model": "echo", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


def test_a_utf8_session_header_and_the_same_user_are_one_conversation(tmp_path):
    store = ConversationStore(f"sqlite:///{tmp_path / 'c.db'}")
    with ServerThread(make_engine(), http_port=0, store=store) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            r = http.post("/v1/chat/completions", json=BODY, headers={"x-session-id": "세션-1".encode()})
            assert r.status_code == 200, r.text
            r = http.post("/v1/chat/completions", json={**BODY, "user": "세션-1"})
            assert r.status_code == 200, r.text
            r = http.post("/v1/chat/completions", json=BODY, headers={"x-session-id": b"\xff\xfe-1"})
            assert r.status_code == 400 and r.json()["error"]["message"] == "X-Session-Id header is not UTF-8 text"
            r = http.post("/v1/chat/completions", json={**BODY, "user": "a\x00b"})
            assert r.status_code == 400 and r.json()["error"]["message"].startswith("user "), r.text
    assert store.flush(timeout=WAIT)
    assert len(store.session("세션-1")) == 2
