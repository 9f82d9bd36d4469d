"""The chat page against a server that is not ready when the page opens, and its "new conversation" button.

A page opened while the server was still loading its models (a restart, a rollout) said "models: the server is
still loading its models; retry shortly" and never retried: the picker stayed empty and the intent badges off until
the user reloaded the page. And "new conversation" cleared the screen but kept the session id, so the store filed
the new conversation's turns under the old one's id (README: the session id is "an id of the conversation", so
"one conversation's turns can be found and exported together")."""

from __future__ import annotations

import logging
import socket
import threading

import pytest
from tests.scenarios.test_http_browser import REPLY, GatedKoreanGenerator
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, ServerThread

from chatforge.serving.engine import Engine

pytestmark = pytest.mark.slow


def _engine() -> Engine:
    return Engine({"echo": FakeGenerator("echo"), "other": FakeGenerator("other")}, {"intents": FakeClassifier()})


def _send(page, text: str) -> None:
    """Send ``text`` and wait for its reply to end (its timing line)."""
    before = page.locator(".msg.assistant .timing").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function("(n) => document.querySelectorAll('.msg.assistant .timing').length === n",
                           arg=before + 1, timeout=WAIT * 1000)


def test_a_page_opened_while_the_server_loads_gets_the_models_once_they_are_loaded(page):
    release = threading.Event()

    def loader() -> Engine:
        if not release.wait(WAIT):
            raise RuntimeError("the test never let the models load")
        return _engine()

    with ServerThread(loader, http_port=0) as st:
        page.goto(f"http://127.0.0.1:{st.server.http.port}/")
        page.wait_for_function("document.getElementById('status').textContent.includes('loading')",
                               timeout=WAIT * 1000)
        assert page.locator("#model option").count() == 0
        release.set()
        st.wait_serving()
        # No reload, no click: the page asks again (as the 503's Retry-After says) and fills the picker.
        page.wait_for_selector("#model option[value='echo']", state="attached", timeout=WAIT * 1000)
        assert page.locator("#model option").all_inner_texts() == ["echo (v1)", "other (v1)"]
        assert page.inner_text("#status") == "intent classifier: intents"
        _send(page, "hello")  # and the classifier's badge is back
        page.wait_for_selector(".msg.user .intent", timeout=WAIT * 1000)


def test_new_conversation_starts_a_new_session(page, caplog):
    caplog.set_level(logging.INFO)
    with ServerThread(_engine(), http_port=0) as st:
        st.wait_serving()
        page.goto(f"http://127.0.0.1:{st.server.http.port}/")
        page.wait_for_selector("#model option[value='echo']", state="attached", timeout=WAIT * 1000)
        first = page.evaluate("sessionStorage.getItem('chatforge.session')")
        _send(page, "one")
        _send(page, "two")
        page.click("#settings summary")
        page.click("#clear")
        second = page.evaluate("sessionStorage.getItem('chatforge.session')")
        _send(page, "three")
        # A reload keeps the tab's (new) session.
        page.reload()
        page.wait_for_selector("#model option[value='echo']", state="attached", timeout=WAIT * 1000)
        assert page.evaluate("sessionStorage.getItem('chatforge.session')") == second
        _send(page, "four")
    sessions = [r.session_id for r in caplog.records if getattr(r, "rpc", None) == "/v1/chat/completions"]
    assert first and second and first != second
    assert sessions == [first, first, second, second]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_page_that_picked_a_model_gone_after_a_restart_offers_the_served_ones(page):
    """The server restarts serving other models (a rollout renamed one): the page's picker still offered the old
    list, and every message to the picked model failed (404) until the page was reloaded."""
    port = _free_port()
    with ServerThread(_engine(), http_port=port) as st:
        st.wait_serving()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#model option[value='other']", state="attached", timeout=WAIT * 1000)
        page.select_option("#model", "other")
        _send(page, "one")
    renamed = Engine({"echo": FakeGenerator("echo"), "other-v2": FakeGenerator("other-v2")},
                     {"intents": FakeClassifier()})
    with ServerThread(renamed, http_port=port) as st:
        st.wait_serving()
        page.fill("#input", "two")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant .error", timeout=WAIT * 1000)
        assert "no generation or selection model named 'other'" in page.inner_text(".msg.assistant .error")
        # The 404 named the model: the page fetched the list again, and offers what is served now.
        page.wait_for_selector("#model option[value='other-v2']", state="attached", timeout=WAIT * 1000)
        assert page.locator("#model option").all_inner_texts() == ["echo (v1)", "other-v2 (v1)"]
        assert page.eval_on_selector("#model", "s => s.value") == "echo"  # the default, the old pick being gone
        _send(page, "three")
        assert page.locator(".msg.assistant .text").last.inner_text() == "Hello there!"


def test_new_conversation_during_a_reply_stops_it(page):
    """"New conversation" in the middle of a reply cleared the screen but left the reply streaming into nothing: the
    server generated it to its end for nobody, and the send button stayed disabled until then."""
    gen = GatedKoreanGenerator()
    engine = Engine({"chat": gen}, {})
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        page.goto(f"http://127.0.0.1:{st.server.http.port}/")
        page.wait_for_selector("#model option[value='chat']", state="attached", timeout=WAIT * 1000)
        page.fill("#input", "안녕")
        page.press("#input", "Enter")
        gen.gate.release()
        page.wait_for_function("(want) => document.querySelector('.msg.assistant .text').textContent === want",
                               arg=REPLY[0], timeout=WAIT * 1000)
        assert page.locator("#send").is_disabled()
        page.click("#settings summary")
        page.click("#clear")
        assert engine.stats.wait_for(lambda s: s.abandoned == 1, WAIT), "the reply was not stopped"
        for _ in range(len(REPLY)):
            gen.gate.release()
        assert engine.stats.wait_for(lambda s: s.running == 0, WAIT)
        page.wait_for_function("!document.getElementById('send').disabled", timeout=WAIT * 1000)
        assert page.locator(".msg").count() == 0  # the cleared screen stays clear
        assert page.evaluate("JSON.parse(sessionStorage.getItem('chatforge.history'))") == []
        page.fill("#input", "다시")
        page.press("#input", "Enter")
        for _ in range(len(REPLY)):
            gen.gate.release()
        page.wait_for_function("(want) => document.querySelector('.msg.assistant .text').textContent === want",
                               arg="".join(REPLY), timeout=WAIT * 1000)
