"""The serving image (deploy/Dockerfile) built and run the way Kubernetes runs it, with podman.

Built on a local base image made from Debian's packages (tools/ci_install_containers.sh; no image
registry is reachable on these machines) and run with a read-only root file system, a tmpfs /tmp, a
writable data volume, every capability dropped, 1 CPU and 1 GiB, the two tiny bundles mounted
read-only as they were written (umask permissions). Through the published ports: gRPC health, a
streamed Reply, Classify, /metrics and /readyz; the HEALTHCHECK passes; no training package is in the
image; `podman stop` (SIGTERM) drains and the server exits 0. The training image
(deploy/Dockerfile.train) is built too and must import the training stack and have torchrun.

Skipped, with the reason printed, only where the container engine cannot start a container.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from tests.container_helpers import LIMITS, build, podman, running, size_mb
from tests.deploy_helpers import (
    TRAIN_ONLY_MODULES,
    free_port,
    http_get,
    say,
    train_tiny_bundles,
    wait_for,
)

from chatforge.client import ChatbotClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def container(serving_image, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image")
    chat, intent = train_tiny_bundles(tmp)
    name, volume = f"chatforge-ci-{uuid.uuid4().hex[:8]}", f"chatforge-ci-data-{uuid.uuid4().hex[:8]}"
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    podman("volume", "create", volume)
    # What deploy/k8s/deployment.yaml asks of the pod: read-only root, tmpfs /tmp, writable /data,
    # no capabilities, no privilege escalation, 1 CPU / 1 GiB.
    podman("run", "-d", "--name", name, *LIMITS, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "--cpus", "1", "--memory", "1g",
            "-v", f"{volume}:/data", "-v", f"{chat}:/models/chat:ro", "-v", f"{intent}:/models/intent:ro",
            "-p", f"127.0.0.1:{grpc_port}:50051", "-p", f"127.0.0.1:{metrics_port}:9100",
            "-p", f"127.0.0.1:{http_port}:8080",
            serving_image, "--model", "chat=/models/chat", "--model", "intent=/models/intent",
            "--host", "0.0.0.0", "--port", "50051", "--http-port", "8080", "--drain-delay", "1", "--grace", "10")
    info = {"name": name, "volume": volume, "grpc": f"127.0.0.1:{grpc_port}",
            "metrics": f"http://127.0.0.1:{metrics_port}", "http": f"http://127.0.0.1:{http_port}", "labels": json.loads((intent / "labels.json").read_text())}
    with running(name, info["metrics"] + "/readyz", volume):
        yield info


def test_serving_image_serves_like_kubernetes_runs_it(container, pytestconfig):
    name = container["name"]
    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"  # non-root
    with ChatbotClient(container["grpc"], timeout=30) as client:
        assert client.health("chatforge.v1.Chatbot") == "SERVING"
        assert client.health("") == "SERVING"
        chunks = list(client.reply_stream("안녕하세요", model="chat", max_new_tokens=8, session_id="image-test"))
        assert chunks[-1].is_final and chunks[-1].completion_tokens == len(chunks) - 1 >= 1
        pred = client.classify("hello", model="intent")
        labels = container["labels"]
        assert pred.label in (labels if isinstance(labels, list) else labels.get("labels", labels))
    status, body = http_get(container["metrics"] + "/metrics")
    assert status == 200 and 'chatforge_requests_total{' in body and 'rpc="Reply"' in body
    assert http_get(container["metrics"] + "/readyz")[0] == 200

    # The HEALTHCHECK is the image's (liveness and readiness), and it passes well within its 3 s timeout.
    hc = json.loads(podman("inspect", name, "--format", "{{json .Config.Healthcheck}}").stdout)
    assert hc["Test"][:3] == ["CMD", "chatforge", "health"] and "chatforge.v1.Chatbot" in hc["Test"]
    assert "" in hc["Test"], hc["Test"]
    start = time.monotonic()
    r = podman("healthcheck", "run", name, check=False)
    took = time.monotonic() - start
    say(pytestconfig, f"\nHEALTHCHECK answered in {took:.2f} s (podman healthcheck run, incl. podman's own start)")
    assert r.returncode == 0, r.stdout + r.stderr

    # The serving extra only: none of the training stack is installed.
    probe = f"import importlib.util as u; print([m for m in {TRAIN_ONLY_MODULES!r} if u.find_spec(m)])"
    assert podman("exec", name, "python3", "-c", probe).stdout.strip() == "[]"
    # ... with the PostgreSQL driver, so CHATFORGE_STORE_URL alone picks the store (the compose postgres profile).
    assert podman("exec", name, "python3", "-c", "import psycopg; print(psycopg.pq.version() > 0)").stdout.strip() == "True"
    # Read-only root, writable /data (the conversation store) and /tmp.
    assert podman("exec", name, "touch", "/opt/x", check=False).returncode != 0
    podman("exec", name, "touch", "/data/probe", "/tmp/probe")


def test_the_image_serves_the_http_api_and_page_to_the_official_client(container):
    # The OpenAI-compatible API and the chat page on the image's port 8080, called through the published port
    # with the official client, as a user of the deployed stack does (HAProxy's :8080 forwards to it).
    openai = pytest.importorskip("openai")
    status, page = http_get(container["http"] + "/")
    assert status == 200 and "<html" in page.lower()
    with openai.OpenAI(base_url=container["http"] + "/v1", api_key="unused", timeout=30, max_retries=0) as client:
        assert {"chat", "intent"} <= {m.id for m in client.models.list().data}
        chunks = list(client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "안녕하세요"}], max_tokens=8, stream=True,
            stream_options={"include_usage": True}))
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] in ("stop", "length")
    assert 1 <= chunks[-1].usage.completion_tokens <= 8


def test_stop_drains_and_exits_zero(container, pytestconfig):
    name = container["name"]
    start = time.monotonic()
    podman("stop", "-t", "30", name, timeout=60)
    took = time.monotonic() - start
    state = json.loads(podman("inspect", name, "--format", "{{json .State}}").stdout)
    logs = podman("logs", name, check=False).stderr
    say(pytestconfig, f"\npodman stop took {took:.1f} s; exit code {state['ExitCode']}")
    assert state["ExitCode"] == 0, logs[-3000:]
    assert '"event": "stopped"' in logs  # the server's own orderly shutdown, not a SIGKILL
    # --cpus 1: torch's pool sized from the cgroup quota (runtime.configure_threads), not pinned by the image's
    # environment (it set OMP_NUM_THREADS=1, which made every container one thread whatever its CPUs)
    threads = [ln for ln in logs.splitlines() if '"torch threads: ' in ln]
    assert len(threads) == 1 and '"torch threads: 1 (CPUs available to this process: affinity ' in threads[0]
    assert "cgroup quota 1.0)" in threads[0], threads
    assert took < 30


def test_training_image_has_the_training_stack(engine, pytestconfig):
    tag = "localhost/chatforge-train:ci"
    took = build("deploy/Dockerfile.train", tag)
    say(pytestconfig, f"\ntraining image {tag}: {size_mb(tag):.0f} MB, built in {took:.0f} s")
    probe = "import mlflow, optuna, sklearn, xgboost, matplotlib, torch.distributed.run; print('ok')"
    r = podman("run", "--rm", *LIMITS, "--network", "none", "--entrypoint", "python3", tag, "-c", probe)
    assert r.stdout.strip().endswith("ok")
    r = podman("run", "--rm", *LIMITS, "--network", "none", "--entrypoint", "torchrun", tag, "--help")
    assert "--nnodes" in r.stdout
    assert "train" in podman("run", "--rm", *LIMITS, "--network", "none", tag, "--help").stdout


def test_the_image_sizes_torch_threads_from_the_cpu_quota(serving_image):
    """The image leaves torch's thread count to `chatforge serve` (runtime.configure_threads): a container's CPU
    quota, not an environment variable baked into the image, decides it. The image used to set OMP_NUM_THREADS=1,
    so `--cpus 2` also ran one thread."""
    probe = "from chatforge.runtime import configure_threads; print(configure_threads())"
    for cpus in sorted({1, min(2, os.cpu_count() or 1)}):
        r = podman("run", "--rm", *LIMITS, "--network", "none", "--cpus", str(cpus), "--entrypoint", "python3",
                    serving_image, "-c", probe)
        assert r.stdout.strip() == str(cpus), (cpus, r.stdout, r.stderr[-1000:])


def test_the_image_serves_a_model_directory_and_hot_swaps_as_its_non_root_user(serving_image, tmp_path):
    """What deploy/k8s runs: `--model-dir /models` on a read-only volume, as uid 10001. The volume's root holds a
    root-only `lost+found` (an ext4 volume has one; it stopped a non-root server from starting), and a second
    version published the documented way (hidden name, then rename) is swapped in while the container serves."""
    import shutil

    chat, _ = train_tiny_bundles(tmp_path / "bundles")
    root = tmp_path / "models"
    shutil.copytree(chat, root / "chat" / "1")
    (root / "lost+found").mkdir(mode=0o700)  # owned by root, as mkfs makes it: uid 10001 cannot list it
    for d, _, files in os.walk(root):
        if not d.endswith("lost+found"):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
    os.chmod(tmp_path, 0o755)
    name, grpc_port, metrics_port = f"chatforge-ci-dir-{uuid.uuid4().hex[:8]}", free_port(), free_port()
    podman("run", "-d", "--name", name, *LIMITS, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges", "-v", f"{root}:/models:ro",
           "-p", f"127.0.0.1:{grpc_port}:50051", "-p", f"127.0.0.1:{metrics_port}:9100",
           serving_image, "--model-dir", "/models", "--poll-interval", "0.5", "--host", "0.0.0.0", "--port", "50051",
           "--drain-delay", "0", "--grace", "5")
    with running(name, f"http://127.0.0.1:{metrics_port}/readyz"):
        with ChatbotClient(f"127.0.0.1:{grpc_port}", timeout=30) as client:
            assert [(m.name, m.version) for m in client.list_models()] == [("chat", "1")]
            shutil.copytree(chat, root / "chat" / ".incoming-2")
            for d, _, files in os.walk(root / "chat" / ".incoming-2"):
                os.chmod(d, 0o755)
                for f in files:
                    os.chmod(os.path.join(d, f), 0o644)
            os.replace(root / "chat" / ".incoming-2", root / "chat" / "2")
            wait_for(lambda: [m.version for m in client.list_models()] == ["2"], 60, "version 2 swapped in")
            assert list(client.reply_stream("안녕하세요", max_new_tokens=4))[-1].model_version == "2"
        logs = podman("logs", name, check=False).stderr
        assert "lost+found" not in logs and '"level": "ERROR"' not in logs, logs[-3000:]
