"""deploy/: every file is exercised (COVERAGE), the files parse, HAProxy accepts its config, compose,
HAProxy, Prometheus and the Dockerfile agree on names and ports, the extras keep training out of serving,
and every metric the Grafana dashboard queries is one the server exports. The Kubernetes manifests are
in test_k8s_manifests.py, the image in test_image.py, failover in test_failover_haproxy.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from tests.deploy_helpers import TRAIN_ONLY_MODULES, train_tiny_bundles

from chatforge.serving.metrics import ServingMetrics
from chatforge.serving.service import SERVICE_NAME

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
GRPC_PORT = 50051
HTTP_PORT = 8080  # the replicas' --http-port and HAProxy's HTTP API frontend


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# Every file in deploy/ and what exercises or validates it (the acceptance: nothing in deploy/
# is untested prose). A new file must be added here with its test.
COVERAGE = {
    "Dockerfile": "tests/scenarios/test_image.py (built and run in CI) + test_dockerfile_*",
    "Dockerfile.train": "tests/scenarios/test_image.py::test_training_image_has_the_training_stack",
    "docker-compose.yml": "test_compose_*",
    "haproxy/haproxy.cfg": "tests/scenarios/test_failover_haproxy.py (real HAProxy) + test_haproxy_*",
    "prometheus/prometheus.yml": "test_compose_prometheus_scrapes_what_the_stack_exposes",
    "grafana/chatforge-dashboard.json": "test_dashboard_queries_only_exported_metrics",
    "k8s/kustomization.yaml": "tests/deploy/test_k8s_manifests.py",
    "k8s/models-pvc.yaml": "tests/deploy/test_k8s_manifests.py",
    "k8s/deployment.yaml": "tests/deploy/test_k8s_manifests.py",
    "k8s/service.yaml": "tests/deploy/test_k8s_manifests.py",
    "k8s/hpa.yaml": "tests/deploy/test_k8s_manifests.py",
    "k8s/pdb.yaml": "tests/deploy/test_k8s_manifests.py",
    "k8s/train-job.yaml": "tests/deploy/test_k8s_manifests.py",
    "wheels/README.md": "tests/scenarios/test_image.py (the build context's WHEELS folder)",
    "no-bundle/README.md": "tests/scenarios/test_image.py (the default BUNDLE build argument)",
}


def test_every_deploy_file_is_exercised():
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "deploy"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout: every file that is not a local build input
        tracked = [str(p.relative_to(REPO)) for p in DEPLOY.rglob("*") if p.is_file() and p.suffix != ".whl"]
    files = sorted(str(Path(f).relative_to("deploy")) for f in tracked)
    assert files == sorted(COVERAGE), "update COVERAGE (and add the test that covers the new file)"


def test_every_deploy_file_parses():
    files = list(DEPLOY.rglob("*.yaml")) + list(DEPLOY.rglob("*.yml"))
    assert len(files) >= 9
    for f in files:
        assert list(yaml.safe_load_all(f.read_text())), f
    assert json.loads((DEPLOY / "grafana" / "chatforge-dashboard.json").read_text())["panels"]


def _haproxy_servers(text: str) -> dict[str, list[list[str]]]:
    backends: dict[str, list[list[str]]] = {}
    current = None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] in ("backend", "frontend", "defaults", "global", "resolvers", "listen"):  # listen: check relays
            current = words[1] if words[0] == "backend" else None
            if current:
                backends[current] = []
        elif words[0] == "server" and current:
            backends[current].append(words)
    return backends


def _haproxy_section(text: str, header: str) -> str:
    """The lines of one section (``backend chatforge_http``), up to the next section or comment block."""
    body = text.split(f"\n{header}\n", 1)[1]
    return re.split(r"\n(?:#|global|defaults|frontend|backend|listen|resolvers)\b", body, maxsplit=1)[0]


def test_haproxy_config_checks_every_replica_every_second():
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    backends = _haproxy_servers(text)
    assert set(backends) == {"chatforge_l4", "chatforge_h2", "chatforge_http"}
    for name, servers in backends.items():
        assert len(servers) == 2, name
        for words in servers:
            # On each server line: HAProxy 2.6 does not apply check-proto from default-server.
            for opt in ("check", "check-proto h1", "inter 1s", "fall 1", "rise 2",
                        "on-marked-down shutdown-sessions"):
                assert opt in " ".join(words), (name, opt)
            assert ("proto h2" in " ".join(words)) == (name == "chatforge_h2")
            port = "${CHATFORGE_HTTP_PORT-8080}" if name == "chatforge_http" else "${CHATFORGE_GRPC_PORT-50051}"
            assert words[2].endswith(f':{port}"'), (name, words[2])
    # Every backend checks readiness the same way, and handles a drain (404 -> NOLB) the same way.
    for name in backends:
        section = _haproxy_section(text, f"backend {name}")
        for must in ("option httpchk GET /readyz", "http-check disable-on-404", "http-check expect status 200",
                     "balance roundrobin"):
            assert must in section, (name, must)
    # A draining replica (503) becomes 404 = NOLB through its check listener; dead or hung ones fail.
    for srv in ("a", "b"):
        assert f'check addr 127.0.0.1 port "${{CHATFORGE_LB_CHECK_{srv.upper()}_PORT-' in text
        listener = text.split(f"listen readyz_{srv}", 1)[1].split("\nlisten ", 1)[0]
        assert "http-response set-status 404 reason draining if { status 503 }" in listener
        assert "retries 0" in listener and "timeout server 800ms" in listener
        assert f"server {srv} \"${{CHATFORGE_REPLICA_{srv.upper()}-chatbot-{srv}}}:${{CHATFORGE_METRICS_PORT-9100}}\"" in listener
    assert text.count("    http-check disable-on-404\n") == 3  # in every backend
    for must in ("option httpchk GET /readyz", "http-check expect status 200", "retries 3",
                 "option redispatch", "timeout check 1s", "retry-on conn-failure empty-response",
                 "bind \"${CHATFORGE_LB_ADDR-}:${CHATFORGE_LB_H2_PORT-50052}\" proto h2"):
        assert must in text, must
    assert re.search(r"frontend grpc_l4\s+mode tcp", text) and re.search(r"frontend grpc_h2\s+mode http", text)
    # In the HTTP/2 backend itself (not only chatforge_http's): it re-sends the streams a replica refuses at its
    # --max-concurrent-streams bound in a burst (tests/scenarios/test_haproxy_h2_streams_bound.py).
    assert "    retry-on conn-failure empty-response\n" in _haproxy_section(text, "backend chatforge_h2")


def test_haproxy_config_serves_the_http_api():
    """The HTTP API frontend: HTTP/1.1 (no proto h2) to the replicas' --http-port, with the requests that
    never got an answer retried, and nothing that would hold back a streamed (SSE) reply."""
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    frontend = _haproxy_section(text, "frontend http_api")
    assert re.match(r"\s+mode http\n", frontend)
    assert 'bind "${CHATFORGE_LB_ADDR-}:${CHATFORGE_LB_HTTP_PORT-8080}"\n' in frontend
    assert "proto h2" not in frontend and "default_backend chatforge_http" in frontend
    assert "timeout http-request" in frontend  # slow request headers cannot hold a connection open
    backend = _haproxy_section(text, "backend chatforge_http")
    assert re.match(r"\s+mode http\n", backend)
    assert "retry-on conn-failure empty-response\n" in backend
    # HAProxy only retries a request it had whole before sending it (a POST body sent after its headers
    # disabled the retry: 502 to the client when a replica was killed under it).
    assert "option http-buffer-request\n" in backend
    # Each token goes out as it comes (test_haproxy_streams_server_sent_events_as_they_come shows why).
    assert "option http-no-delay\n" in backend
    for words in _haproxy_servers(text)["chatforge_http"]:
        assert "proto" not in words  # HTTP/1.1, what uvicorn speaks
    # A compression filter would hold a streamed reply back: none in any active line.
    active = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    for never in ("compression", "filter "):
        assert never not in active, never
    # The streamed reply's own pings (every PING_S while idle) keep it inside the server timeout.
    from chatforge.serving.http import PING_S

    server_timeout = float(re.search(r"^\s+timeout server (\d+)s$", text, re.M).group(1))
    assert server_timeout > PING_S


def test_haproxy_accepts_the_config():
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (tools/ci_install_containers.sh installs Debian's package)")
    env = {**os.environ, "CHATFORGE_REPLICA_A": "127.0.0.2", "CHATFORGE_REPLICA_B": "127.0.0.3"}
    r = subprocess.run(["haproxy", "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "Configuration file is valid" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "[WARNING]" not in r.stdout + r.stderr, r.stdout + r.stderr


SSE_EVENTS = 20


class _SseReplica(BaseHTTPRequestHandler):
    """A stand-in replica: /readyz 200 (through the check listeners), and a POST answered with SSE events
    written one at a time, each only after the client got the one before (``acked``)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # our writes go out at once; any holding back is HAProxy's
    acked: list[threading.Event] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        body = b'{"status": "ready"}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-store")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i, acked in enumerate(self.acked):
            data = f"data: {i}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            if not acked.wait(10):  # held back by the balancer: the test fails on its own bound
                return
        self.wfile.write(b"0\r\n\r\n")


def test_haproxy_streams_server_sent_events_as_they_come(tmp_path):
    """The shipped config, run by a real HAProxy, forwards each event of a streamed reply the moment the
    replica writes it: the replica writes event i+1 only once the client has event i, so a balancer that
    buffered the response would stall the stream, and one that corked small writes (MSG_MORE, up to 200 ms
    each) would take seconds for the 20 events."""
    httpx = pytest.importorskip("httpx")
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (tools/ci_install_containers.sh installs Debian's package)")
    from tests.deploy_helpers import free_port, http_get, wait_for

    _SseReplica.acked = [threading.Event() for _ in range(SSE_EVENTS)]
    replica = ThreadingHTTPServer(("127.0.0.1", 0), _SseReplica)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    port = str(replica.server_address[1])
    lb_http, stats = free_port(), free_port()
    env = {**os.environ, "CHATFORGE_REPLICA_A": "127.0.0.1", "CHATFORGE_REPLICA_B": "127.0.0.1",
           "CHATFORGE_HTTP_PORT": port, "CHATFORGE_METRICS_PORT": port, "CHATFORGE_GRPC_PORT": str(free_port()),
           "CHATFORGE_LB_ADDR": "127.0.0.1", "CHATFORGE_LB_HTTP_PORT": str(lb_http),
           "CHATFORGE_LB_TCP_PORT": str(free_port()), "CHATFORGE_LB_H2_PORT": str(free_port()),
           "CHATFORGE_LB_STATS_PORT": str(stats), "CHATFORGE_LB_CHECK_A_PORT": str(free_port()),
           "CHATFORGE_LB_CHECK_B_PORT": str(free_port())}
    log = tmp_path / "haproxy.log"
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    try:
        def http_servers_up() -> bool:
            status, body = http_get(f"http://127.0.0.1:{stats}/stats;csv")
            rows = [r.split(",") for r in body.splitlines() if r.startswith("chatforge_http,")]
            return status == 200 and sum(1 for r in rows if r[1] in ("a", "b") and r[17] == "UP") == 2

        wait_for(http_servers_up, 15, "HAProxy marks both HTTP servers UP")
        got, start = [], time.monotonic()
        with httpx.Client(timeout=15) as client, client.stream(
                "POST", f"http://127.0.0.1:{lb_http}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            for line in response.iter_lines():
                if line.startswith("data: "):
                    got.append(int(line[6:]))
                    _SseReplica.acked[got[-1]].set()
        took = time.monotonic() - start
    finally:
        for acked in _SseReplica.acked:
            acked.set()
        proc.terminate()
        proc.wait(timeout=10)
        replica.shutdown()
        replica.server_close()
    assert got == list(range(SSE_EVENTS)), log.read_text()[-2000:]
    assert took < 2.0, f"{SSE_EVENTS} events took {took:.2f} s through HAProxy: held back between writes"


class _Ready(BaseHTTPRequestHandler):
    """A replica's metrics port as HAProxy's checks see it: /readyz 200."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()


@pytest.mark.parametrize("frontend", ["CHATFORGE_LB_TCP_PORT", "CHATFORGE_LB_H2_PORT"], ids=["tcp", "h2"])
def test_haproxy_carries_grpc_reflection_health_and_a_streamed_reply(tmp_path, frontend):
    """Through both gRPC frontends of the shipped config, run by a real HAProxy in front of a real server:
    reflection (a bidirectional stream: what grpcurl and Postman use), the standard health check and a
    streamed Reply. The failover test covers the Chatbot RPCs in each mode; nothing ran reflection's
    bidirectional stream or the health service through the balancer."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    from tests.deploy_helpers import free_port, http_get, wait_for
    from tests.serving_fakes import ServerThread, make_engine

    from chatforge.v1 import chatbot_pb2 as pb
    from chatforge.v1 import chatbot_pb2_grpc as pb_grpc

    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (tools/ci_install_containers.sh installs Debian's package)")
    ready = ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=ready.serve_forever, daemon=True).start()
    with ServerThread(make_engine()) as st:
        st.wait_serving()
        grpc_port = st.target.rsplit(":", 1)[1]
        ports = {k: str(free_port()) for k in ("CHATFORGE_LB_TCP_PORT", "CHATFORGE_LB_H2_PORT", "CHATFORGE_LB_HTTP_PORT",
                                               "CHATFORGE_LB_STATS_PORT", "CHATFORGE_LB_CHECK_A_PORT",
                                               "CHATFORGE_LB_CHECK_B_PORT", "CHATFORGE_HTTP_PORT")}
        env = {**os.environ, **ports, "CHATFORGE_REPLICA_A": "127.0.0.1", "CHATFORGE_REPLICA_B": "127.0.0.1",
               "CHATFORGE_GRPC_PORT": grpc_port, "CHATFORGE_METRICS_PORT": str(ready.server_address[1]),
               "CHATFORGE_LB_ADDR": "127.0.0.1"}
        log = tmp_path / "haproxy.log"
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")], env=env,
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        backend = "chatforge_l4" if frontend == "CHATFORGE_LB_TCP_PORT" else "chatforge_h2"
        try:
            def servers_up() -> bool:
                status, body = http_get(f"http://127.0.0.1:{ports['CHATFORGE_LB_STATS_PORT']}/stats;csv")
                rows = [r.split(",") for r in body.splitlines() if r.startswith(backend + ",")]
                return status == 200 and sum(1 for r in rows if r[1] in ("a", "b") and r[17] == "UP") == 2

            wait_for(servers_up, 15, f"HAProxy marks both {backend} servers UP")
            with grpc.insecure_channel(f"127.0.0.1:{ports[frontend]}") as channel:
                services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
                assert {"chatforge.v1.Chatbot", "grpc.health.v1.Health"} <= services
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                chunks = list(pb_grpc.ChatbotStub(channel).Reply(
                    pb.ReplyRequest(text="hello", options=pb.GenerationOptions(max_new_tokens=2)), timeout=10))
            assert [c.delta.text for c in chunks[:-1]] == ["Hel", "lo"], log.read_text()[-2000:]
            assert chunks[-1].final.finish_reason == "length"
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            ready.shutdown()
            ready.server_close()


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_two_replicas_behind_haproxy():
    compose = _compose()
    services = compose["services"]
    replicas = {n: s for n, s in services.items() if n.startswith("chatbot-")}
    assert sorted(replicas) == ["chatbot-a", "chatbot-b"]
    hp = services["haproxy"]
    # haproxy.cfg's replica addresses are these service names.
    assert {hp["environment"]["CHATFORGE_REPLICA_A"], hp["environment"]["CHATFORGE_REPLICA_B"]} == set(replicas)
    assert "./haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in hp["volumes"]
    # host side configurable (CHATFORGE_PUBLISH_*), container side fixed
    assert {"50051", "50052", str(HTTP_PORT)} <= {p.rsplit(":", 1)[-1] for p in hp["ports"]}
    for name, svc in replicas.items():
        cmd, env = svc["command"], svc["environment"]
        assert int(_flag(cmd, "--port")) == GRPC_PORT and _flag(cmd, "--host") == "0.0.0.0"
        # The HTTP API on the port haproxy.cfg's chatforge_http backend reaches (its default).
        assert int(_flag(cmd, "--http-port")) == HTTP_PORT and str(HTTP_PORT) in svc["expose"]
        assert {str(GRPC_PORT), env["CHATFORGE_METRICS_PORT"]} <= set(svc["expose"])
        assert env["CHATFORGE_METRICS_PORT"] == "9100" and env["CHATFORGE_SERVER_NAME"] == name
        delay, grace = float(_flag(cmd, "--drain-delay")), float(_flag(cmd, "--grace"))
        assert float(svc["stop_grace_period"].rstrip("s")) > delay + grace
        assert svc["read_only"] and svc["cap_drop"] == ["ALL"] and "/tmp" in svc["tmpfs"]
        mounts = {v.split(":")[-2 if v.endswith(":ro") else -1]: v for v in svc["volumes"]}
        assert mounts["/models/chat"].endswith(":ro") and "/data" in mounts
    for svc in services.values():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), image  # pinned
    assert services["postgres"]["profiles"] == ["postgres"] and "envoy" not in services
    # The image's EXTRAS build argument: by default the PostgreSQL driver is in, so the postgres profile needs
    # no other build.
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for svc in replicas.values():
        assert set(svc["build"]["args"]) <= set(re.findall(r"^ARG (\w+)", dockerfile, re.M))
        assert svc["build"]["args"]["EXTRAS"] == "${CHATFORGE_EXTRAS:-serve,postgres}"
    assert re.search(r"^ARG EXTRAS=serve,postgres$", dockerfile, re.M)


def test_compose_prometheus_scrapes_what_the_stack_exposes():
    compose = _compose()
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose["services"]["prometheus"]["volumes"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"chatbot-a:9100", "chatbot-b:9100", "haproxy:8404"}
    assert "${CHATFORGE_LB_STATS_PORT-8404}" in (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def _dockerfile_lines(name: str) -> list[str]:
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_dockerfile_multi_stage_non_root_with_health_check():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = _dockerfile_lines("Dockerfile")
    base = next(ln for ln in lines if ln.startswith("ARG BASE_IMAGE="))
    assert re.fullmatch(r"ARG BASE_IMAGE=python:3\.\d+\.\d+-slim-bookworm", base)  # pinned by version
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms == ["FROM ${BASE_IMAGE} AS build", "FROM ${BASE_IMAGE}"]
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("root", "0")
    assert "STOPSIGNAL SIGTERM" in lines
    hc = re.search(r"HEALTHCHECK.*?CMD (\[.*?\])", text, re.S)
    assert hc is not None
    cmd = json.loads(hc.group(1))
    assert cmd[:2] == ["chatforge", "health"] and SERVICE_NAME in cmd and f"127.0.0.1:{GRPC_PORT}" in cmd
    assert "--timeout=3s" in hc.group(0) and "" in cmd  # liveness ("") and readiness, one connection
    assert 'ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu' in lines  # CPU torch by default
    assert "ARG EXTRAS=serve,postgres" in lines and '".[${EXTRAS}]"' in text  # serving + the PostgreSQL driver, no training stack
    assert "CHATFORGE_METRICS_PORT=9100" in text and f"EXPOSE 50051 {HTTP_PORT} 9100" in lines
    cmd = json.loads(next(ln for ln in lines if ln.startswith("CMD [")).split(" ", 1)[1])
    assert int(_flag(cmd, "--http-port")) == HTTP_PORT and int(_flag(cmd, "--port")) == GRPC_PORT
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignore and "runs" in ignore and "!deploy/wheels" in ignore
    for line in lines:
        if line.startswith(("CMD [", "ENTRYPOINT [")):
            json.loads(line.split(" ", 1)[1])  # exec form: SIGTERM reaches chatforge, not a shell


def test_extras_split_keeps_training_out_of_serving():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml itself")

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = lambda reqs: {re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower() for r in reqs}  # noqa: E731
    training = {"mlflow-skinny", "optuna", "matplotlib", "sacrebleu", "alembic"}
    estimators = {"xgboost-cpu", "scikit-learn", "faiss-cpu"}
    assert not (training | estimators) & (names(project["dependencies"]) | names(extras["serve"]))
    assert training <= names(extras["train"]) and {"torch", "grpcio", "sentencepiece"} <= names(extras["serve"])
    # a server of estimator bundles (the hybrid bot's selector) installs serve,estimators: no training stack
    assert names(extras["estimators"]) == estimators and not training & names(extras["estimators"])
    assert "chatforge[serve,estimators]" in extras["train"] and "chatforge[serve,train]" in extras["dev"]
    # what a bundle that lacks them is told to install is that extra, for every package it may need
    from chatforge.registry import OPTIONAL_MODULES

    assert {dist for dist, extra in OPTIONAL_MODULES.values() if extra == "estimators"} == estimators | {"scipy"}


def test_serving_runs_without_the_training_packages(tmp_path):
    """A generation and a classification bundle load and answer with every training-only package
    made unimportable: what the serving image (chatforge[serve]) can do."""
    chat, intent = train_tiny_bundles(tmp_path)
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TRAIN_ONLY_MODULES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: training only)")
sys.meta_path.insert(0, Block())
import chatforge.cli, chatforge.serving.server
from chatforge.inference import load_model
from chatforge.decoding import GenerationOptions
gen = load_model({str(chat)!r}, "chat")
print("reply", len(list(gen.stream("hello", GenerationOptions(max_new_tokens=4)))))
print("label", load_model({str(intent)!r}, "intent").classify(["hello"])[0].label)
print("loaded", sorted(m for m in {TRAIN_ONLY_MODULES!r} if m in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reply " in r.stdout and "label " in r.stdout and "loaded []" in r.stdout


@pytest.fixture()
def exported_sample_names(monkeypatch) -> set[str]:
    """Every sample name a ServingMetrics registry exports once each metric has a value."""
    # Pretend CUDA is present so the GPU collector reports its metric names too.
    fake_cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1,
                                      memory_allocated=lambda i: 0, memory_reserved=lambda i: 0)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=fake_cuda))
    m = ServingMetrics()
    from chatforge.inference import ModelInfo

    m.set_model_info(ModelInfo("chat", "fake", "generation"))
    m.request_queued("chat")
    m.request_dequeued("chat", 0.01)
    m.request_started("Reply", "chat")
    m.prompt_tokens("chat", 3)
    m.batch("chat", 1)
    m.first_token("Reply", "chat", 0.01)
    m.token("chat", 0.01)
    m.draft_tokens("chat", 4, 3)
    m.reply_answered("fallback", "chat", True)
    m.request_finished("Reply", "chat", "INTERNAL", 0.1, reason="internal")
    m.watch_store(types.SimpleNamespace(available=True, pending=0, written=1, failed=0, dropped=0))
    return {s.name for fam in m.registry.collect() for s in fam.samples}


def test_dashboard_queries_only_exported_metrics(exported_sample_names):
    dash = json.loads((DEPLOY / "grafana" / "chatforge-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    queried = {name for e in exprs for name in re.findall(r"\bchatforge_[a-z0-9_]+", e)}
    assert len(queried) >= 15
    missing = sorted(queried - exported_sample_names)
    assert not missing, f"dashboard queries metrics the server does not export: {missing}"
    # and the headline metrics of the issue are on the dashboard
    for must in ("chatforge_time_to_first_token_seconds_bucket", "chatforge_inter_token_latency_seconds_bucket",
                 "chatforge_requests_waiting", "chatforge_request_failure_total",
                 "chatforge_process_resident_memory_bytes", "chatforge_gpu_memory_allocated_bytes",
                 "chatforge_store_pending_turns", "chatforge_store_available"):
        assert must in queried, must
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("env", "argv", "expected"), [
    ({"CHATFORGE_METRICS_PORT": "9321"}, [], 9321),            # the image and the manifests set this
    ({"CHATFORGE_METRICS_PORT": "9321"}, ["--metrics-port", "9400"], 9400),  # the flag wins
    ({}, [], None),                                            # neither: no metrics HTTP server
])
def test_serve_reads_the_metrics_port_from_the_environment(tmp_path, monkeypatch, env, argv, expected):
    from typer.testing import CliRunner

    import chatforge.serving.server as server
    from chatforge.cli import app

    seen = {}
    monkeypatch.setattr(server, "run_server", lambda config, **kw: seen.update(config=config))
    monkeypatch.delenv("CHATFORGE_METRICS_PORT", raising=False)
    (tmp_path / "bundle").mkdir()
    r = CliRunner().invoke(app, ["serve", "--model", f"chat={tmp_path / 'bundle'}", *argv], env=env)
    assert r.exit_code == 0, r.output
    assert seen["config"].metrics_port == expected


def _readme_commands(prefix: str) -> list[str]:
    """README's shell commands starting with ``prefix``, continuation lines joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]


def test_the_readme_runs_the_image_with_a_stop_timeout_longer_than_its_drain():
    """An operator's review: `docker run` as the README wrote it, then `docker stop`, SIGKILLed the server 10 s
    after SIGTERM (docker's and podman's default), cutting a stream the default command's drain (--drain-delay 5
    + --grace 10) would have finished. An image cannot set its stop timeout; the run command must."""
    cmd = json.loads(next(line for line in _dockerfile_lines("Dockerfile") if line.startswith("CMD "))[4:])
    drain = float(_flag(cmd, "--drain-delay")) + float(_flag(cmd, "--grace"))
    runs = [c for c in _readme_commands("docker run") if " chatforge:0.1.0" in c]
    assert runs
    for run in runs:
        words = run.split()
        assert "--stop-timeout" in words, run
        assert float(words[words.index("--stop-timeout") + 1]) > drain, run


def test_compose_passes_the_base_image_so_it_builds_without_a_registry():
    """`docker compose ... up -d --build` pulled python:3.11.11-slim-bookworm: compose passed only EXTRAS, so the
    documented no-registry base (localhost/chatforge-base:bookworm) could not be given."""
    for name, svc in _compose()["services"].items():
        if name.startswith("chatbot-"):
            assert svc["build"]["args"]["BASE_IMAGE"] == "${CHATFORGE_BASE_IMAGE:-python:3.11.11-slim-bookworm}"
    default = re.search(r"^ARG BASE_IMAGE=(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    assert default == "python:3.11.11-slim-bookworm"
    assert "CHATFORGE_BASE_IMAGE=localhost/chatforge-base:bookworm" in (REPO / "docs" / "operations.md").read_text()


def test_the_training_images_run_command_names_a_config_inside_it_and_a_writable_run_folder():
    """Dockerfile.train's header said `train configs/demo.yaml` (the image's configs are in /app/configs, and it
    works in /runs) and mounted a host folder the image's user 10001 cannot write."""
    text = (DEPLOY / "Dockerfile.train").read_text()
    header = " ".join(line.lstrip("# ").rstrip("\\ ") for line in text.splitlines() if line.startswith("#"))
    lines = _dockerfile_lines("Dockerfile.train")
    assert "COPY configs /app/configs" in lines and "WORKDIR /runs" in lines
    for run in [*_readme_commands("mkdir -p runs && docker run"), header]:
        assert "train /app/configs/demo.yaml" in run and '--user "$(id -u):$(id -g)"' in run, run
