"""The chat page's conversation after a failed message, in a real browser (tests/scenarios/test_http_browser.py's
Chromium through Playwright, skipped, naming why, where it is missing).

The page added each message to the conversation it sends before the request, and kept it there when the server
refused it: after one message over the server's length limit, every later message was refused for that one
(``messages[2].content is ... characters long``) until "new conversation" was clicked.
"""

from __future__ import annotations

import json

import pytest
from tests.scenarios import test_http_browser
from tests.scenarios.test_http_browser import open_page_and_send
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, ServerThread

from chatforge.serving.engine import Engine

pytestmark = pytest.mark.slow

page = test_http_browser.page  # Debian's Chromium through Playwright
REPLY = "Hello there!"  # FakeGenerator's tokens


def _wait_for_replies(page, n: int) -> None:
    """Until the page has finished ``n`` replies (each gets ``data-finish`` when its request ends)."""
    page.wait_for_function("(n) => document.querySelectorAll('.msg.assistant[data-finish]').length === n",
                           arg=n, timeout=WAIT * 1000)


def test_a_refused_message_is_shown_but_left_out_of_the_conversation(page):
    engine = Engine({"chat": FakeGenerator("chat"), "echo": FakeGenerator("echo")}, {"intents": FakeClassifier()},
                    max_input_chars=50)
    sent: list[list[dict]] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)["messages"])
            if r.url.endswith("/v1/chat/completions") else None)
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        open_page_and_send(page, f"http://127.0.0.1:{st.server.http.port}", "hello")
        _wait_for_replies(page, 1)
        too_long = "a" * 60  # over the server's 50 characters: 400
        page.fill("#input", too_long)
        page.press("#input", "Enter")
        _wait_for_replies(page, 2)
        page.fill("#input", "hello again")
        page.press("#input", "Enter")
        _wait_for_replies(page, 3)

        replies = page.locator(".msg.assistant")
        assert replies.nth(0).locator(".text").inner_text() == REPLY
        assert "at most 50" in replies.nth(1).locator(".error").inner_text()
        # The next message is answered: the refused one was not sent again...
        assert replies.nth(2).locator(".error").count() == 0, replies.nth(2).inner_text()
        assert replies.nth(2).locator(".text").inner_text() == REPLY
        # ...and it is still on screen, marked, with the error under the reply's place.
        failed = page.locator(".msg.user").nth(1)
        assert failed.locator(".text").inner_text() == too_long and "failed" in failed.get_attribute("class")
        assert failed.locator(".badge.failed").inner_text() == "failed: left out of the conversation"
        stored = page.evaluate("JSON.parse(sessionStorage.getItem('chatforge.history'))")
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": REPLY}]
    assert sent == [turns[:1], [*turns, {"role": "user", "content": too_long}],
                    [*turns, {"role": "user", "content": "hello again"}]]
    assert stored == [*turns, {"role": "user", "content": "hello again"}, {"role": "assistant", "content": REPLY}]
