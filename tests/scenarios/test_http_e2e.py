"""`chatforge serve --http-port` through the real CLI with a real (tiny) bundle: both surfaces from one
process, a streamed Korean reply over HTTP that matches the gRPC reply token for token, then SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from tests.scenarios.test_e2e import train_tiny_demo, wait_for_file

from chatforge.client import ChatbotClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return train_tiny_demo(tmp_path_factory.mktemp("http-e2e") / "run")[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_http_port_streams_the_same_reply_as_grpc(bundle, tmp_path):
    port_file, http_port = tmp_path / "port", _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatforge.cli", "serve", "--model", f"chat={bundle}", "--port", "0",
         "--port-file", str(port_file), "--http-port", str(http_port), "--grace", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "CHATFORGE_ENV": "test"})
    try:
        target = f"127.0.0.1:{wait_for_file(port_file, proc)}"
        with ChatbotClient(target, timeout=30) as client:
            grpc_tokens = [c.text for c in client.reply_stream("안녕하세요", max_new_tokens=6,
                                                                     min_new_tokens=6) if not c.is_final]
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as http:
            assert http.get("/readyz").status_code == 200
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["chat"]
            body = {"model": "chat", "messages": [{"role": "user", "content": "안녕하세요"}], "max_tokens": 6,
                    "min_tokens": 6, "stream": True}  # min: a 6-step model would often stop at once
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
        assert deltas[0] == {"role": "assistant", "content": ""}
        http_tokens = [d["content"] for d in deltas[1:] if "content" in d]
        # Greedy: the same tokens, one chunk each (empty texts included), as over gRPC.
        assert http_tokens == grpc_tokens and len(http_tokens) == 6
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.TransportError):  # HTTP stopped with the gRPC server
            httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
