"""The chat page clicked through the shipped balancer: Chromium -> real HAProxy -> chatforge.

What an operator's users do: open the page on HAProxy's HTTP port (deploy/haproxy/haproxy.cfg, frontend
``http_api``, backend ``chatforge_http``), type a message and watch the reply grow, then stop one mid-reply.
The config is the shipped file run unchanged; only its addresses and ports come from the environment (as
tests/deploy/test_deploy.py and tests/scenarios/test_failover_haproxy.py run it), all on 127.0.0.1. Both of
its HTTP servers (``a`` and ``b``) point at the one chatforge server, whose metrics port answers their
health checks through the config's check listeners.

The model is test_http_browser.py's gated fake: each token waits for the test's go-ahead, so the test
knows exactly what the page may show at each moment. A balancer that held the event stream back (buffered
it, compressed it, or corked small writes) fails the test: the page would show fewer tokens than the model
has produced, or show each one only after the kernel's 200 ms cork timer.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.deploy_helpers import REPO, free_port, http_get, say, wait_for
from tests.scenarios import test_http_browser
from tests.scenarios.test_http_browser import REPLY, GatedKoreanGenerator
from tests.serving_fakes import WAIT, FakeClassifier, FakeGenerator, ServerThread

from chatforge.inference import TokenDelta
from chatforge.serving.engine import Engine

pytestmark = pytest.mark.slow

HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
# A long Korean reply: more tokens, a steadier median of the per-token latencies below.
LONG_REPLY = [*REPLY, " 오늘은 ", "맑고 ", "따뜻한 ", "날씨", "예요", "."]
# From the model's token to the page's text, through HAProxy, per token (median). Measured: 6-11 ms with
# the shipped config; 217 ms without its `option http-no-delay`, every token waiting for the kernel's 200 ms
# cork timer (the backend's comment in haproxy.cfg explains it), which this bound catches.
MEDIAN_TOKEN_MS = 120.0


class CountingGatedGenerator(GatedKoreanGenerator):
    """test_http_browser's gated fake, with the reply set here and the tokens produced per call."""

    def __init__(self, tokens: list[str]) -> None:
        super().__init__()
        self.tokens = list(tokens)
        self.produced_per_call: list[int] = []

    def stream(self, text, options) -> Iterator[TokenDelta]:
        self.produced_per_call.append(0)
        before = self.produced
        for delta in super().stream(text, options):
            self.produced_per_call[-1] = self.produced - before
            yield delta


def _haproxy() -> str:
    found = shutil.which("haproxy")
    if found is None:
        reason = "haproxy is not installed (tools/ci_install_containers.sh installs Debian's package)"
        print(f"SKIP test_http_browser_haproxy: {reason}")
        pytest.skip(reason)
    return found


class Balancer:
    """The real haproxy binary running the shipped config, every listener on a free 127.0.0.1 port."""

    def __init__(self, exe: str, http_port: int, metrics_port: int, log: Path, grpc_port: int | None = None):
        self.http, self.stats = free_port(), free_port()
        self.log = log
        self.env = {**os.environ, "CHATFORGE_REPLICA_A": "127.0.0.1", "CHATFORGE_REPLICA_B": "127.0.0.1",
                    "CHATFORGE_HTTP_PORT": str(http_port), "CHATFORGE_METRICS_PORT": str(metrics_port),
                    "CHATFORGE_GRPC_PORT": str(grpc_port or free_port()), "CHATFORGE_LB_ADDR": "127.0.0.1",
                    "CHATFORGE_LB_HTTP_PORT": str(self.http), "CHATFORGE_LB_STATS_PORT": str(self.stats),
                    "CHATFORGE_LB_TCP_PORT": str(free_port()), "CHATFORGE_LB_H2_PORT": str(free_port()),
                    "CHATFORGE_LB_CHECK_A_PORT": str(free_port()), "CHATFORGE_LB_CHECK_B_PORT": str(free_port())}
        self._out = open(log, "ab")
        self.proc = subprocess.Popen([exe, "-db", "-f", str(HAPROXY_CFG)], env=self.env, stdout=self._out,
                                     stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stats_rows(self, backend: str = "chatforge_http") -> dict[str, dict[str, str]]:
        """The backend's rows of HAProxy's CSV stats, by server name (``BACKEND`` for the whole backend)."""
        status, body = http_get(f"http://127.0.0.1:{self.stats}/stats;csv")
        if status != 200:
            return {}
        rows = csv.DictReader(io.StringIO(body.removeprefix("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == backend}

    def answered(self) -> int:
        """Requests the ``chatforge_http`` backend has passed to its servers and got a 2xx answer to."""
        row = self.stats_rows().get("BACKEND")
        assert row is not None, f"no chatforge_http row in HAProxy's stats\n{self.log_tail()}"
        return int(row["hrsp_2xx"] or 0)

    def wait_up(self) -> None:
        def both_up() -> bool:
            assert self.proc.poll() is None, f"haproxy exited ({self.proc.returncode}):\n{self.log_tail()}"
            rows = self.stats_rows()
            return all(rows.get(s, {}).get("status") == "UP" for s in ("a", "b"))

        try:
            wait_for(both_up, 15, "HAProxy marks both chatforge_http servers UP")
            wait_for(lambda: http_get(f"{self.url}/readyz")[0] == 200, WAIT, "/readyz 200 through HAProxy")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\nhaproxy log:\n{self.log_tail()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._out.close()


def _wait_text(page, want: str, released: int, lb: Balancer) -> float:
    """Wait (bounded) until the last reply in the page reads ``want``; the seconds it took. The bound is
    below the fake's own (a token not let through within WAIT ends the reply with an error, and the
    end of the response would flush whatever a balancer held back)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    start, bound = time.monotonic(), WAIT / 2
    try:
        page.wait_for_function("(want) => document.querySelector('.msg.assistant:last-child .text')"
                               ".textContent === want", arg=want, timeout=bound * 1000, polling=5)
        return time.monotonic() - start
    except PlaywrightTimeout:
        shown = page.locator(".msg.assistant .text").last.inner_text()
    pytest.fail(f"the model has made {released} token(s) of the reply, but after {bound:.0f} s the page, through "
                f"HAProxy, shows {shown!r} instead of {want!r}: the balancer holds the event stream back\n"
                f"haproxy log:\n{lb.log_tail()}")


def test_chat_page_through_haproxy_streams_token_by_token_and_stops(page, tmp_path, pytestconfig):
    exe = _haproxy()
    gen = CountingGatedGenerator(LONG_REPLY)
    engine = Engine({"chat": gen, "echo": FakeGenerator("echo")}, {"intents": FakeClassifier()})
    with ServerThread(engine, http_port=0, metrics_port=0) as st:
        st.wait_serving()
        lb = Balancer(exe, st.server.http.port, st.server.metrics_http.port, tmp_path / "haproxy.log")
        try:
            lb.wait_up()
            # HAProxy counts a response in its stats a moment after the client has it: wait_up's one 2xx (its
            # /readyz) must be in the count before the page's requests are counted from it (a run read 0 here
            # and then counted 9 for the page's 8).
            wait_for(lambda: lb.answered() >= 1, WAIT, "HAProxy's stats count wait_up's /readyz")
            before = lb.answered()
            seen_urls: list[str] = []
            page.on("request", lambda r: seen_urls.append(r.url))

            # 1. The page, its script and style, and its model list, all from HAProxy's port; 2. a Korean
            #    message; the reply grows one token at a time: after the model's k-th token the page shows
            #    exactly tokens 1..k, before the (k+1)-th is made.
            reply = test_http_browser.open_page_and_send(page, lb.url, "안녕! 반가워요")
            seen, took = [], []
            for k in range(1, len(LONG_REPLY) + 1):
                gen.gate.release()
                took.append(_wait_text(page, "".join(LONG_REPLY[:k]), k, lb))
                seen.append(reply.inner_text())
                assert gen.produced == k, f"the gate let {gen.produced} tokens through, expected {k}"
            assert seen == ["".join(LONG_REPLY[:k]) for k in range(1, len(LONG_REPLY) + 1)]
            page.wait_for_selector(".msg.assistant:last-child .timing", timeout=WAIT * 1000)
            timing = page.locator(".msg.assistant").last.locator(".timing").inner_text()
            assert f"{len(LONG_REPLY)} tokens" in timing, timing
            assert page.locator(".msg.user .intent").first.inner_text().startswith("intent greet")
            median_ms = statistics.median(took) * 1000
            assert median_ms < MEDIAN_TOKEN_MS, (
                f"through HAProxy a token took {median_ms:.0f} ms (median; each: "
                f"{', '.join(f'{t * 1000:.0f}' for t in took)} ms) from the model to the page: the balancer "
                f"holds small writes back (is `option http-no-delay` still in backend chatforge_http?)")

            # 3. A second message, stopped after two tokens. HAProxy passes the browser's abort on to the
            #    server, which cancels the generation: the model makes fewer tokens than the reply has.
            #    HAProxy (2.6) does not watch a client's connection while it waits for the response: it
            #    learns of the abort only when it writes to the closed connection, i.e. when the model makes
            #    its next token or two (or at the stream's idle ping); `option abortonclose` does not change
            #    that. So tokens are let through one at a time, each once the one before has been made,
            #    until the server has the request CANCELLED.
            page.fill("#input", "날씨 어때요?")
            page.press("#input", "Enter")
            gen.gate.release()
            gen.gate.release()
            _wait_text(page, "".join(LONG_REPLY[:2]), 2, lb)
            assert page.locator("#stop").is_enabled()
            page.click("#stop")
            page.wait_for_selector(".msg.assistant:last-child .stopped", timeout=WAIT * 1000)

            def cancelled() -> float:
                return sum(s.value for m in st.server.metrics.registry.collect() if m.name == "chatforge_requests"
                           for s in m.samples if s.name == "chatforge_requests_total"
                           and s.labels.get("status") == "CANCELLED")

            released, deadline = 2, time.monotonic() + WAIT
            while cancelled() == 0 and time.monotonic() < deadline:
                if gen.produced_per_call[-1] == released and released < len(LONG_REPLY):
                    gen.gate.release()
                    released += 1
                time.sleep(0.05)
            assert cancelled() == 1, (
                f"the page stopped the reply, the model made {gen.produced_per_call[-1]} of its "
                f"{len(LONG_REPLY)} tokens, and the server never saw the request cancelled through HAProxy\n"
                f"haproxy log:\n{lb.log_tail()}")
            after_stop = released - 2
            for _ in range(len(LONG_REPLY)):
                gen.gate.release()
            assert engine.stats.wait_for(lambda s: s.running == 0 and s.dropped == 1, WAIT), engine.stats
            assert gen.produced_per_call[-1] < len(LONG_REPLY), gen.produced_per_call
            # The stopped reply did not grow in the page after the stop.
            assert page.locator(".msg.assistant .text").last.inner_text() == "".join(LONG_REPLY[:2])
            assert page.locator("#send").is_enabled() and not page.locator("#stop").is_enabled()
            assert [c[0] for c in gen.calls] == ["안녕! 반가워요", "날씨 어때요?"]

            # 4. Everything the page loaded went to HAProxy's port (the server listens on another one), and
            #    HAProxy's backend counted each of those requests.
            shot = tmp_path / "chat-page-haproxy.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            paths = [u.removeprefix(lb.url) for u in seen_urls]
            assert all(u.startswith(f"{lb.url}/") for u in seen_urls), seen_urls
            for path in ("/", "/static/chat.js", "/static/chat.css", "/v1/models", "/v1/classify",
                         "/v1/chat/completions"):
                assert path in paths, (path, paths)
            assert paths.count("/v1/chat/completions") == 2, paths
            # Each with a 2xx answer (Chromium's own /favicon.ico request, a 404, is not one of the page's).
            wait_for(lambda: lb.answered() - before >= len(seen_urls), WAIT, "HAProxy's stats count the page's requests")
            counted = lb.answered() - before
            assert counted == len(seen_urls), (f"HAProxy's backend chatforge_http answered {counted} requests with "
                                               f"2xx, the page made {len(seen_urls)}: {paths}")
            say(pytestconfig, f"chat page through HAProxy: {counted} requests via backend chatforge_http; "
                              f"model -> page per token {median_ms:.0f} ms median, {max(took) * 1000:.0f} ms max; "
                              f"stop: cancelled server-side after {after_stop} more token(s) were let through")
        finally:
            lb.stop()
