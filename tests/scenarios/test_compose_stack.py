"""deploy/docker-compose.yml run as an operator runs it: ``podman-compose up`` of the shipped file, unchanged, with
the serving image built from deploy/Dockerfile, two replicas, HAProxy and Prometheus on compose's own network
(service names resolved by its DNS), then called through the published ports with the official clients: gRPC
in both HAProxy modes, the OpenAI-compatible API, the chat page; Prometheus scraping every target; one replica
stopped (SIGTERM, drained, exit 0) while calls go on, and started again.

No image registry is reachable on these machines, so the two upstream images the file names (HAProxy,
Prometheus) are stand-ins built here from Debian's packages (HAProxy 2.6, as the file pins; Prometheus 2.42,
the file pins 2.53) and tagged with the names the file uses, only where no image of that name exists: a real
upstream image is used as it is. podman runs with this machine's two quirks (runc; nofile soft 1024 and nproc
4096, which its defaults exceed) through CONTAINERS_CONF, not through the compose file.

Skipped, with the reason printed, where the container engine cannot start a container, podman-compose is missing,
or podman's networks have no DNS (the dnsname CNI plugin; tools/ci_install_containers.sh installs it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
from tests.compose_helpers import UP_TIMEOUT_S, Stack, running_stack
from tests.container_helpers import podman
from tests.deploy_helpers import REPO, http_get, say, wait_for

from chatforge.client import ChatbotClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(serving_image, tmp_path_factory, pytestconfig):
    with running_stack(serving_image, tmp_path_factory.mktemp("compose"), pytestconfig) as st:
        yield st


def _published(stack: Stack) -> dict[str, str]:
    """Host side of each port mapping of the running HAProxy container -> container port."""
    raw = json.loads(podman("inspect", stack.container("haproxy"), "--format", "{{json .NetworkSettings.Ports}}").stdout)
    return {f"{b['HostIp']}:{b['HostPort']}": cport for cport, binds in raw.items() for b in binds or []}


def test_compose_stack_serves_grpc_http_and_page_through_haproxy(stack):
    # The ports the operator asked for, on the address asked for, and nothing else published.
    published = _published(stack)
    assert published == {stack.target("GRPC"): "50051/tcp", stack.target("GRPC_H2"): "50052/tcp",
                         stack.target("HTTP"): "8080/tcp", stack.target("STATS"): "8404/tcp"}, published
    before = stack.servers()
    for which in ("GRPC", "GRPC_H2"):
        with ChatbotClient(stack.target(which), timeout=30) as client:
            assert client.health("chatforge.v1.Chatbot") == "SERVING"
            for i in range(6):
                chunks = list(client.reply_stream(f"안녕하세요 {i}", model="chat", max_new_tokens=6))
                assert chunks[-1].is_final and chunks[-1].completion_tokens == len(chunks) - 1 >= 1
    # HTTP/2 mode balances each call, so one channel's six calls reached both replicas.
    after = stack.servers()
    h2 = {s: int(after[("chatforge_h2", s)]["stot"]) - int(before[("chatforge_h2", s)]["stot"]) for s in "ab"}
    assert h2["a"] >= 1 and h2["b"] >= 1, h2

    openai = pytest.importorskip("openai")
    status, page = http_get(stack.url("HTTP") + "/", timeout=10)
    assert status == 200 and "<html" in page.lower()
    with openai.OpenAI(base_url=stack.url("HTTP") + "/v1", api_key="unused", timeout=30, max_retries=0) as client:
        assert "chat" in {m.id for m in client.models.list().data}
        chunks = list(client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "안녕하세요"}], max_tokens=6, stream=True))
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])


@pytest.mark.parametrize("frontend, protocol", [("GRPC", "grpc"), ("HTTP", "http")])
def test_compose_loadtest_through_haproxy_meets_a_zero_error_slo(stack, tmp_path, frontend, protocol, pytestconfig):
    """The compose file's own load-test line, as an operator runs it: the CLI against HAProxy's TCP frontend and
    the HTTP API, with an SLO gate on errors."""
    out = tmp_path / protocol
    r = subprocess.run([sys.executable, "-m", "chatforge.cli", "loadtest", stack.target(frontend), "--protocol",
                        protocol, "-c", "4", "-n", "40", "--max-new-tokens", "4", "--slo", "errors=0%",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert (report["count"], report["ok"], report["errors"]) == (40, 40, 0), report["error_messages"]
    say(pytestconfig, f"\nloadtest {protocol} via HAProxy: 40 calls, p50 {report['latency_s']['p50'] * 1e3:.0f} ms")


def _prometheus(stack: Stack, path: str, **query: str) -> dict:
    status, body = http_get(f"{stack.url('PROMETHEUS')}{path}?{urllib.parse.urlencode(query)}", timeout=5)
    return json.loads(body) if status == 200 else {}


def test_compose_prometheus_scrapes_both_replicas_and_haproxy(stack):
    def healthy() -> dict[str, str]:
        targets = _prometheus(stack, "/api/v1/targets").get("data", {}).get("activeTargets", [])
        return {t["labels"]["instance"]: t["health"] for t in targets}

    wait_for(lambda: healthy() == {"chatbot-a:9100": "up", "chatbot-b:9100": "up", "haproxy:8404": "up"}, 60,
             f"Prometheus scraping all three targets (last: {healthy()})", interval=1.0)
    # chatforge's own series, from each replica, as the dashboard reads them
    series = _prometheus(stack, "/api/v1/series", **{"match[]": '{job="chatforge", __name__=~"chatforge_.+"}'})
    instances = {s["instance"] for s in series.get("data", [])}
    assert instances == {"chatbot-a:9100", "chatbot-b:9100"}, instances


def test_compose_stop_drains_one_replica_while_calls_go_on(stack, pytestconfig):
    """`podman-compose stop chatbot-a` (SIGTERM): HAProxy takes it out, calls through the HTTP/2 frontend keep
    succeeding on the other replica, the replica exits 0 after its drain, and `start` brings it back."""
    failures: list[str] = []
    done = threading.Event()
    calls = [0]

    def caller() -> None:
        with ChatbotClient(stack.target("GRPC_H2"), timeout=30) as client:
            while not done.is_set():
                try:
                    chunks = list(client.reply_stream("안녕", model="chat", max_new_tokens=4))
                    assert chunks[-1].is_final
                except Exception as e:  # noqa: BLE001 - every failure is collected and reported
                    failures.append(f"{type(e).__name__}: {e}")
                calls[0] += 1

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        stack.compose("stop", "chatbot-a", timeout=120)
        took = time.monotonic() - start
        state = json.loads(podman("inspect", stack.container("chatbot-a"), "--format", "{{json .State}}").stdout)
        assert state["ExitCode"] == 0, stack.logs("chatbot-a")
        assert '"event": "stopped"' in stack.logs("chatbot-a")  # its own orderly shutdown, not a SIGKILL
        # While it drained its health check answered 404, which HAProxy reads as NOLB (no new calls); once it has
        # exited the next check (every second, fall 1) marks it DOWN in each proxy. Right after `stop` returns a proxy
        # may not have checked yet (CI once read {'DOWN', 'NOLB'} there), so wait for the checks, bounded.
        wait_for(lambda: (st := stack.backend_states("a")) and all(s.startswith(("DOWN", "MAINT")) for s in st),
                 10, "chatbot-a DOWN in every proxy", interval=0.2)
        assert stack.backend_states("b") == {"UP"}
        n = calls[0]
        wait_for(lambda: calls[0] >= n + 3, 60, "three more calls with one replica stopped")
        stack.compose("start", "chatbot-a", timeout=120)
        wait_for(lambda: stack.backend_states("a") == {"UP"}, UP_TIMEOUT_S, "chatbot-a UP again", interval=0.5)
    finally:
        done.set()
        thread.join(timeout=60)
    say(pytestconfig, f"\ncompose stop chatbot-a: {took:.1f} s (drain), {calls[0]} calls, {len(failures)} failed")
    assert not failures, failures[:5]
    assert calls[0] >= 5
