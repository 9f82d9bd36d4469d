"""The chat page's conversation after a failed message, in a real browser (tests/scenarios/test_http_browser.py's
Chromium through Playwright, skipped, naming why, where it is missing).

The page added each message to the conversation it sends before the request, and kept it there when the server
refused it: after one message over the server's length limit, every later message was refused for that one
(``messages[2].content is ... characters long``) until "new conversation" was clicked.
"""

from __future__ import annotations

import json

import pytest
from tests.scenarios.test_http_browser import open_page_and_send
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, ServerThread

from chatforge.serving.engine import Engine

pytestmark = pytest.mark.slow

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


def test_the_picker_offers_selection_models_and_keeps_the_users_choice_when_models_reload(page):
    """A served ranker (a selection model) was not in the picker at all; and a reload of the model list (entering
    an API key does one) put the default model back, so the next message went to the model the user had not
    picked. Found by driving the page against `chatforge serve --model transformer=... --model ranker=...`."""
    from tests.serving.test_policy import FakeSelector

    engine = Engine({"chat": FakeGenerator("chat"), "echo": FakeGenerator("echo")}, {"intents": FakeClassifier()},
                    retrievers={"selector": FakeSelector()})
    sent: list[str | None] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data).get("model"))
            if r.url.endswith("/v1/chat/completions") else None)
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        page.goto(f"http://127.0.0.1:{st.server.http.port}/")
        page.wait_for_selector("#model option[value='selector']", state="attached", timeout=WAIT * 1000)
        assert page.locator("#model option").all_inner_texts() == ["chat (v1)", "echo (v1)", "selector (v7)"]
        assert page.eval_on_selector("#model", "s => s.value") == "chat"  # the default generator
        page.select_option("#model", "selector")
        page.click("#settings summary")
        page.fill("#apikey", "some-key")
        with page.expect_response(lambda r: r.url.endswith("/v1/models")):
            page.dispatch_event("#apikey", "change")  # what leaving the field does: the list is fetched again
        assert page.eval_on_selector("#model", "s => s.value") == "selector"
        page.fill("#input", "how is the weather")
        page.press("#input", "Enter")
        _wait_for_replies(page, 1)
        assert page.locator(".msg.assistant .text").last.inner_text() == "맑아요."
        timing = page.locator(".msg.assistant .timing").last.inner_text()
        assert timing.endswith("retrieval reply") and "0 tokens" not in timing, timing
    assert sent == ["selector"]
