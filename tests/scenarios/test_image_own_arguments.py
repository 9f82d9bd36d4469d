"""The serving image run with arguments of one's own (they replace its default command; README, Deploy) is reachable
through its published ports. `chatforge:0.1.0 --model-dir /models` bound 127.0.0.1 inside the container (serve's
default host): nothing answered on the published ports while the HEALTHCHECK, run inside, said healthy."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest
from tests.container_helpers import LIMITS, podman
from tests.deploy_helpers import free_port, http_get, train_tiny_bundles, wait_for

from chatforge.client import ChatbotClient

pytestmark = pytest.mark.slow


def test_the_image_with_only_a_model_dir_argument_answers_on_its_published_ports(serving_image, tmp_path):
    chat, _ = train_tiny_bundles(tmp_path / "bundles")
    root = tmp_path / "models"
    shutil.copytree(chat, root / "chat" / "1")
    for d, _, files in os.walk(root):  # readable by the image's uid 10001
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    name, grpc_port, metrics_port = f"chatforge-ci-args-{uuid.uuid4().hex[:8]}", free_port(), free_port()
    podman("run", "-d", "--name", name, *LIMITS, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
           "-v", f"{root}:/models:ro", "-p", f"127.0.0.1:{grpc_port}:50051", "-p", f"127.0.0.1:{metrics_port}:9100",
           serving_image, "--model-dir", "/models")
    try:
        def logs() -> str:
            return podman("logs", name, check=False).stderr

        def exited() -> bool:
            return podman("inspect", name, "--format", "{{.State.Running}}", check=False).stdout.strip() == "false"

        wait_for(lambda: '"event": "serving"' in logs() or exited(), 120, "the server's 'serving' line")
        assert '"address": "0.0.0.0:50051"' in logs(), logs()[-3000:]
        wait_for(lambda: http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200, 20,
                 "/readyz through the published port")
        with ChatbotClient(f"127.0.0.1:{grpc_port}", timeout=30) as client:
            assert client.health("chatforge.v1.Chatbot") == "SERVING"
            assert [(m.name, m.version) for m in client.list_models()] == [("chat", "1")]
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
