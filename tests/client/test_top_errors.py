"""``chatforge top`` pointed at something that answers, but not as a metrics endpoint (the gRPC port, a server
speaking another protocol): one line naming the address and the port to give, exit 1 like a connection error.
It printed a traceback ending in http.client.BadStatusLine."""

from __future__ import annotations

import socketserver
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from typer.testing import CliRunner

from chatforge.client.top import MonitorError, ResourceMonitor


@pytest.fixture
def grpc_port():
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


class _Garbage(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5.0)
        self.rfile.readline()
        self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n")  # some other protocol's greeting, not an HTTP status line


def test_the_grpc_port_is_not_a_metrics_endpoint(grpc_port):
    with pytest.raises(MonitorError) as info:
        ResourceMonitor(f"127.0.0.1:{grpc_port}", timeout=5).sample()
    message = str(info.value)
    assert f"127.0.0.1:{grpc_port}/metrics" in message and "did not answer as a metrics endpoint" in message
    assert "\n" not in message and "\x00" not in message  # one printable line (the raw HTTP/2 bytes escaped)


def test_cli_top_at_the_grpc_port_fails_in_one_line(grpc_port):
    from chatforge.cli import app

    r = CliRunner().invoke(app, ["top", f"127.0.0.1:{grpc_port}", "--count", "1"], env={"COLUMNS": "300"})
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.exception  # not BadStatusLine
    assert "did not answer as a metrics endpoint" in r.output and "--metrics-port" in r.output
    assert "Traceback" not in r.output


def test_a_server_answering_another_protocol_is_not_a_metrics_endpoint():
    server = socketserver.TCPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with pytest.raises(MonitorError, match="did not answer as a metrics endpoint"):
            ResourceMonitor(f"127.0.0.1:{server.server_address[1]}", timeout=5).sample()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
