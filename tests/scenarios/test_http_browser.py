"""The chat page in a real browser: Debian's headless Chromium driven by Playwright.

Playwright's own browser download cannot run here, so the system browser is launched through
``executable_path``. The model is a fake whose every token waits for the test's go-ahead, so
the test sees the reply grow in the page one token at a time, and can press stop mid-reply.
A screenshot is saved under the test's output folder (and to ``$CHATFORGE_SCREENSHOT_DIR``
when set: that is how docs/img/chat-page.png is made).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, FakeSelector, ServerThread

from chatforge.decoding import GenerationOptions
from chatforge.inference import TokenDelta
from chatforge.serving.engine import Engine
from chatforge.serving.policy import ReplyPolicy

pytestmark = pytest.mark.slow

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REPLY = ["안녕하세요", "! ", "무엇을 ", "도와", "드릴까요", "?"]


def _chromium() -> str:
    for path in (os.environ.get("CHATFORGE_CHROMIUM"), *CHROMIUM_CANDIDATES):
        if path and Path(path).is_file():
            return path
    found = shutil.which("chromium")
    if found:
        return found
    reason = ("no Chromium found (looked for $CHATFORGE_CHROMIUM, " + ", ".join(CHROMIUM_CANDIDATES)
              + "); install it with tools/ci_install_browser.sh")
    print(f"SKIP test_http_browser: {reason}")  # visible in -s / CI logs besides pytest's -ra summary
    pytest.skip(reason)


class GatedKoreanGenerator(FakeGenerator):
    """Yields REPLY one token at a time, each only after ``gate`` is released once."""

    def __init__(self) -> None:
        super().__init__(name="chat", tokens=REPLY)
        self.gate = threading.Semaphore(0)
        self.produced = 0

    def stream(self, text: str, options: GenerationOptions) -> Iterator[TokenDelta]:
        self.calls.append((text, options))
        for i, tok in enumerate(self.tokens[: options.max_new_tokens]):
            if not self.gate.acquire(timeout=WAIT):
                raise RuntimeError("the test never let this token through")
            self.produced += 1
            yield TokenDelta(token_id=100 + i, text=tok)


def _save(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    out_dir = os.environ.get("CHATFORGE_SCREENSHOT_DIR")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(out_dir) / name)
    return path


def open_page_and_send(page, base_url: str, text: str, models=("chat (v1)", "echo (v1)")):
    """Open the chat page at ``base_url``, check its model list (the fake engine's, ``models``), send ``text`` to the
    first; returns the locator of the assistant's reply."""
    page.goto(f"{base_url}/")
    page.wait_for_selector("#model option[value='chat']", state="attached", timeout=WAIT * 1000)
    assert page.locator("#model option").all_inner_texts() == list(models)
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_selector(f".msg.user >> text={text}", timeout=WAIT * 1000)
    return page.locator(".msg.assistant .text").last


def test_chat_page_streams_korean_token_by_token_and_stops(page, tmp_path):
    gen = GatedKoreanGenerator()
    engine = Engine({"chat": gen, "echo": FakeGenerator("echo")}, {"intents": FakeClassifier()})
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        # 1. A Korean message; the reply appears token by token as the model makes it.
        reply = open_page_and_send(page, f"http://127.0.0.1:{st.server.http.port}", "안녕! 반가워요")
        seen = []
        for i in range(len(REPLY)):
            gen.gate.release()
            want = "".join(REPLY[: i + 1])
            page.wait_for_function("(want) => document.querySelector('.msg.assistant:last-child .text')"
                                   ".textContent === want", arg=want, timeout=WAIT * 1000)
            seen.append(reply.inner_text())
        assert seen == ["".join(REPLY[: i + 1]) for i in range(len(REPLY))]
        last = page.locator(".msg.assistant").last
        page.wait_for_selector(".msg.assistant:last-child .timing", timeout=WAIT * 1000)
        timing = last.locator(".timing").inner_text()
        assert timing.startswith("TTFT ") and "6 tokens" in timing and "tok/s" in timing
        # The classifier's view of the user's message is shown beside it.
        assert page.locator(".msg.user .intent").first.inner_text().startswith("intent greet")
        # Phone width: nothing sticks out sideways.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390

        # 2. A second message (the conversation is kept); stop it after two tokens.
        page.fill("#input", "날씨 어때요?")
        page.press("#input", "Enter")
        gen.gate.release()
        gen.gate.release()
        page.wait_for_function("(want) => document.querySelector('.msg.assistant:last-child .text')"
                               ".textContent === want", arg="".join(REPLY[:2]), timeout=WAIT * 1000)
        assert page.locator("#stop").is_enabled()
        page.click("#stop")
        page.wait_for_selector(".msg.assistant:last-child .stopped", timeout=WAIT * 1000)
        # The server sees the page's request go away (the engine counts the reply abandoned and flags it cancelled);
        # only then may the generator run on, or a fast one would finish the reply before the cancel lands (CI once
        # saw the reply complete instead of being dropped).
        assert engine.stats.wait_for(lambda s: s.abandoned == 1, WAIT), "the server never saw the page stop"
        # The server drops the sequence (the runner sees the cancel at its next token).
        for _ in range(len(REPLY)):
            gen.gate.release()
        assert engine.stats.wait_for(lambda s: s.running == 0 and s.dropped == 1, WAIT), engine.stats
        assert gen.produced < 2 * len(REPLY)  # the stopped reply did not run to its end
        assert page.locator("#send").is_enabled() and not page.locator("#stop").is_enabled()
        # The page sent the whole conversation: the model saw the last user message as input.
        assert [c[0] for c in gen.calls] == ["안녕! 반가워요", "날씨 어때요?"]
        stored = page.evaluate("JSON.parse(sessionStorage.getItem('chatforge.history'))")
        assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
        shot = _save(page, tmp_path, "chat-page.png")
        assert shot.stat().st_size > 10_000


def test_chat_page_says_which_path_answered_and_shows_the_guards_fallback(page, tmp_path):
    """A hybrid bot (a selector in front of the generator, behind a reply policy with the familiarity guard): a
    retrieved reply appears whole, labelled with the path that gave it ("retrieval reply", not "0 tokens"), and a
    message the guard refuses gets the policy's fallback with the out-of-scope badge. CI's other browser tests drive
    the page with a plain generator only."""
    fallback = "잘 모르겠어요. 다르게 말씀해 주시겠어요?"
    selector = FakeSelector()
    policy = ReplyPolicy.from_dict({"fallback_reply": fallback, "retriever": "selector", "min_familiarity": -6.0,
                                    "retrieval_threshold": 0.9})
    engine = Engine({"chat": FakeGenerator("chat"), "echo": FakeGenerator("echo")}, {"intents": FakeClassifier()},
                    retrievers={"selector": selector}, policy=policy, continuous_batching=False)
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        reply = open_page_and_send(page, f"http://127.0.0.1:{st.server.http.port}", "오늘 날씨 어때",
                                   models=("chat (v1)", "echo (v1)", "selector (v3)"))
        page.wait_for_selector(".msg.assistant:last-child .timing", timeout=WAIT * 1000)
        assert reply.inner_text() == selector.reply
        timing = page.locator(".msg.assistant").last.locator(".timing").inner_text()
        assert timing.startswith("TTFT ") and timing.endswith("retrieval reply") and "tokens" not in timing
        assert page.locator(".msg.assistant").last.locator(".badge.oos").count() == 0

        page.fill("#input", "asdf qwer zxcv")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant:nth-of-type(4) .badge.oos", timeout=WAIT * 1000)
        last = page.locator(".msg.assistant").last
        assert last.locator(".text").inner_text() == fallback
        assert last.locator(".badge.oos").inner_text() == "fallback (out of scope)"
        assert last.locator(".timing").inner_text().endswith("fallback reply")
        assert selector.selected == ["오늘 날씨 어때"]  # the guard answered the second message before retrieval
        shot = _save(page, tmp_path, "chat-page-hybrid.png")
        assert shot.stat().st_size > 10_000
