"""The chat page reads a stream as a whole reply only once ``data: [DONE]`` arrived, and reads SSE in any of its
line endings (tests/scenarios/test_http_browser.py's Chromium through Playwright, skipped where it is missing).

A stream cut before its end (a replica killed or drained mid-reply, a proxy's timeout) was shown as a finished reply
and joined the conversation every later request sends, as if the model had said only that; and a stream whose
events a proxy framed with CRLF (SSE allows CRLF, LF or CR) showed nothing at all, also as a finished reply."""

from __future__ import annotations

import json

import pytest
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, ServerThread

from chatforge.serving.engine import Engine

pytestmark = pytest.mark.slow

ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}


def _token(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def _sse(events: list, newline: str = "\n") -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}{newline}{newline}" for e in events)


def _send_with_answer(page, body: str) -> None:
    """Open the page on a real server, answer the next completion with ``body`` (a 200 SSE stream) and send one
    message; returns once the page has finished that reply."""
    engine = Engine({"chat": FakeGenerator("chat")}, {"intents": FakeClassifier()})
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, headers={"content-type": "text/event-stream; charset=utf-8"}, body=body))
        page.goto(f"http://127.0.0.1:{st.server.http.port}/")
        page.wait_for_selector("#model option[value='chat']", state="attached", timeout=WAIT * 1000)
        page.fill("#input", "hello")
        page.press("#input", "Enter")
        page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-finish]').length === 1",
                               timeout=WAIT * 1000)


def _history(page) -> list:
    return page.evaluate("JSON.parse(sessionStorage.getItem('chatforge.history') || '[]')")


def test_a_stream_cut_before_done_is_an_error_and_stays_out_of_the_conversation(page):
    _send_with_answer(page, _sse([ROLE, _token("Hel"), _token("lo")]))  # no finish, no [DONE]: cut
    reply = page.locator(".msg.assistant").last
    assert reply.locator(".text").inner_text() == "Hello"  # what came is still shown...
    assert "cut short" in reply.locator(".error").inner_text()  # ...marked as cut
    assert "failed" in page.locator(".msg.user").last.get_attribute("class")
    assert _history(page) == []


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
def test_a_stream_framed_with_crlf_or_cr_is_read(page, newline):
    _send_with_answer(page, _sse([ROLE, _token("Hel"), _token("lo", "stop"), "[DONE]"], newline))
    reply = page.locator(".msg.assistant").last
    assert reply.locator(".text").inner_text() == "Hello"
    assert reply.locator(".error").count() == 0
    assert reply.get_attribute("data-finish") == "stop"
    assert _history(page) == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hello"}]


def test_a_whole_stream_is_still_a_reply(page):
    _send_with_answer(page, _sse([ROLE, _token("Hel"), _token("lo", "stop"), "[DONE]"]))
    assert page.locator(".msg.assistant .error").count() == 0
    assert _history(page) == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hello"}]
