"""deploy/: the files parse, probes and health checks point at the right ports and service,
and every metric the Grafana dashboard queries is one the server exports."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from chatforge.serving.metrics import ServingMetrics
from chatforge.serving.service import SERVICE_NAME

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
GRPC_PORT = 50051


def _k8s() -> dict[str, list[dict]]:
    docs: dict[str, list[dict]] = {}
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                docs.setdefault(doc["kind"], []).append(doc)
    return docs


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_every_deploy_file_parses():
    files = list(DEPLOY.rglob("*.yaml")) + list(DEPLOY.rglob("*.yml"))
    assert len(files) >= 7
    for f in files:
        assert list(yaml.safe_load_all(f.read_text())), f
    assert json.loads((DEPLOY / "grafana" / "chatforge-dashboard.json").read_text())["panels"]


def test_k8s_deployment_probes():
    docs = _k8s()
    assert set(docs) >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    dep = docs["Deployment"][0]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == GRPC_PORT == int(_flag(c["args"], "--port"))
    # Readiness (and startup) ask for the Chatbot service itself: NOT_SERVING while loading and draining.
    for probe in ("readinessProbe", "startupProbe"):
        assert c[probe]["grpc"] == {"port": GRPC_PORT, "service": SERVICE_NAME}, probe
    assert c["readinessProbe"]["periodSeconds"] <= 2 and c["readinessProbe"]["failureThreshold"] == 1
    assert c["livenessProbe"]["grpc"]["port"] == GRPC_PORT
    # The startup probe must allow a slow model load before liveness may kill the pod.
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 60
    # SIGKILL must never cut the drain: grace period > preStop pause + the server's --grace.
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(_flag(c["args"], "--grace"))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "0.0.0.0" in c["args"]  # reachable from the kubelet and the Service, not only localhost


def test_k8s_selectors_line_up():
    docs = _k8s()
    dep = docs["Deployment"][0]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for svc in docs["Service"]:
        assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports
    (hpa,) = docs["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (pdb,) = docs["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a drain can still make progress
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")
                                               if p.name != "kustomization.yaml")


def test_compose_two_replicas_behind_envoy_with_1s_grpc_health_checks():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    bot = compose["services"]["chatbot"]
    assert bot["deploy"]["replicas"] == 2
    assert int(_flag(bot["command"], "--port")) == GRPC_PORT
    grace = float(_flag(bot["command"], "--grace"))
    assert float(bot["stop_grace_period"].rstrip("s")) > grace
    envoy_svc = compose["services"]["envoy"]
    assert "./envoy.yaml:/etc/envoy/envoy.yaml:ro" in envoy_svc["volumes"]
    assert (DEPLOY / "envoy.yaml").is_file()

    envoy = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())
    (cluster,) = envoy["static_resources"]["clusters"]
    (hc,) = cluster["health_checks"]
    assert hc["interval"] == "1s" and hc["grpc_health_check"]["service_name"] == SERVICE_NAME
    addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert addr == {"address": "chatbot", "port_value": GRPC_PORT}  # the compose service name, resolved per replica
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "ROUND_ROBIN"
    # gRPC needs HTTP/2 to the upstreams.
    opts = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]


def test_dockerfile_non_root_with_health_check():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("root", "0")
    hc = re.search(r'HEALTHCHECK.*?CMD (\[.*?\])', text, re.S)
    assert hc is not None
    cmd = json.loads(hc.group(1))
    assert cmd[:2] == ["chatforge", "health"] and SERVICE_NAME in cmd
    assert f"127.0.0.1:{GRPC_PORT}" in cmd
    assert "--index-url" in text  # CPU torch wheels, not the CUDA ones
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignore and "runs" in ignore
    for line in lines:
        if line.startswith(("CMD [", "ENTRYPOINT [")):
            json.loads(line.split(" ", 1)[1])  # exec form: SIGTERM reaches chatforge, not a shell


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
    m.request_finished("Reply", "chat", "INTERNAL", 0.1, reason="internal")
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
                 "chatforge_process_resident_memory_bytes", "chatforge_gpu_memory_allocated_bytes"):
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
    monkeypatch.setattr(server, "run_server", lambda *a, **kw: seen.update(kw))
    monkeypatch.delenv("CHATFORGE_METRICS_PORT", raising=False)
    (tmp_path / "bundle").mkdir()
    r = CliRunner().invoke(app, ["serve", "--model", f"chat={tmp_path / 'bundle'}", *argv], env=env)
    assert r.exit_code == 0, r.output
    assert seen["metrics_port"] == expected
