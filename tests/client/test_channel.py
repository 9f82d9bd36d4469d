"""ChatbotClient: channel ownership, options, errors, request ids, retries config, fd hygiene."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.client import channel as client_mod
from chatforge.serving import server as server_mod

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def server():
    with ServerThread(make_engine()) as st:
        st.wait_serving()
        yield st


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reply_and_reply_stream(server):
    with ChatbotClient(server.target, timeout=WAIT) as client:
        assert client.reply("hello", max_new_tokens=2) == "Hello"
        chunks = list(client.reply_stream("hello", model="other", session_id="s-1"))
    assert [c.is_final for c in chunks] == [False] * 4 + [True]
    assert chunks[-1].model == "other" and chunks[-1].completion_tokens == 4
    assert chunks[-1].text == "" and chunks[-1].token_id is None


def test_unknown_generation_option_is_rejected_before_sending(server):
    with ChatbotClient(server.target) as client, pytest.raises(TypeError, match="tempreature.*allowed: .*temperature"):
        client.reply("hi", tempreature=0.5)


def test_close_is_idempotent_and_context_manager_closes():
    client = ChatbotClient("127.0.0.1:1")
    client.close()
    client.close()
    with ChatbotClient("127.0.0.1:1") as c2:
        pass
    assert c2._closed and client._closed


def test_constructor_validates():
    with pytest.raises(ValueError, match="target"):
        ChatbotClient("")
    with pytest.raises(ValueError, match="timeout"):
        ChatbotClient("127.0.0.1:1", timeout=0)


def test_unreachable_server_raises_chatbot_error_with_code():
    with ChatbotClient(f"127.0.0.1:{_closed_port()}", timeout=2.0) as client:
        with pytest.raises(ChatbotError) as err:
            client.health()
        assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert err.value.details
        with pytest.raises(ChatbotError, match="could not connect") as err:
            client.wait_for_ready(timeout=0.2)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_wait_for_ready_returns_when_connected(server):
    with ChatbotClient(server.target) as client:
        client.wait_for_ready(timeout=WAIT)
        assert client.health() == "SERVING"


def test_fixed_request_id_and_error_request_id(server, caplog):
    with ChatbotClient(server.target, timeout=WAIT, request_id="upstream-42") as client:
        with caplog.at_level(logging.INFO, logger="chatforge.serving.interceptors"):
            client.reply("hello", max_new_tokens=1, session_id="sess-9")
            server.run(_noop())  # the server logs when the call ends; let its loop run once
        assert client.last_request_id == "upstream-42"
        with pytest.raises(ChatbotError) as err:
            client.reply("")
        # Errors carry the id too (in the trailers): the client can quote it to an operator.
        assert err.value.request_id == "upstream-42" and "upstream-42" in str(err.value)
        assert client.last_request_id == "upstream-42"
    # The first interceptor record is the Reply's (later calls may be captured too when another
    # test left the root logger at INFO).
    rec = [r for r in caplog.records if getattr(r, "request_id", None) == "upstream-42"
           and r.name == "chatforge.serving.interceptors"][0]
    assert rec.session_id == "sess-9"


async def _noop():
    return None


def test_channel_config_retries_throttles_times_out_and_keepalive_matches_server():
    config = json.loads(dict(client_mod.CHANNEL_OPTIONS)["grpc.service_config"])
    by_method = {n["method"]: m for m in config["methodConfig"] for n in m["name"]}
    assert set(by_method) == {"Reply", "Classify", "ListModels", "Check"}
    for m in by_method.values():
        policy = m["retryPolicy"]
        assert set(policy["retryableStatusCodes"]) == {"UNAVAILABLE"}  # RESOURCE_EXHAUSTED: the client's own retry
        assert policy["maxAttempts"] >= 2 and m["timeout"].endswith("s")
    assert config["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.1}
    assert "loadBalancingConfig" not in config  # one address: pick_first, no health gating
    multi = json.loads(client_mod.service_config(round_robin=True, health_check=True))
    assert multi["loadBalancingConfig"] == [{"round_robin": {}}]
    assert multi["healthCheckConfig"] == {"serviceName": "chatforge.v1.Chatbot"}
    client_opts, server_opts = dict(client_mod.CHANNEL_OPTIONS), dict(server_mod.SERVER_OPTIONS)
    # A client pinging more often than the server accepts would be sent GOAWAY too_many_pings.
    assert client_opts["grpc.keepalive_time_ms"] >= server_opts["grpc.http2.min_recv_ping_interval_without_data_ms"]
    assert client_opts["grpc.keepalive_permit_without_calls"] == 1
    # Connections are recycled (L4 balancers rebalance) well before the client's idle timeout.
    assert server_opts["grpc.max_connection_age_ms"] < client_opts["grpc.client_idle_timeout_ms"]
    assert server_opts["grpc.max_connection_age_grace_ms"] > 0


@pytest.mark.slow
def test_fd_count_stable_over_many_client_cycles(server):
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    # A local subchannel pool gives every client its own TCP connection (by default grpc
    # shares one per target across channels, which would hide a client that never closes).
    options = [("grpc.use_local_subchannel_pool", 1)]
    for _ in range(20):  # warm up grpc's own threads and pollers
        with ChatbotClient(server.target, timeout=WAIT, options=options) as client:
            client.health()
    before = fds()
    n = 2000
    for _ in range(n):
        with ChatbotClient(server.target, timeout=WAIT, options=options) as client:
            assert client.health() == "SERVING"
    after = fds()
    assert after - before <= 10, f"open fds grew from {before} to {after} over {n} client cycles"


# ---------------------------------------- the client side imports no torch (issue 12, item 10)
MODEL_SIDE = ("torch", "sklearn", "mlflow", "xgboost", "chatforge.inference", "chatforge.decoding", "chatforge.models",
              "chatforge.serving")


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_client_module_imports_no_torch():
    r = _fresh_python("import sys, chatforge.client, chatforge.client.http, chatforge.client.loadtest, "
                      "chatforge.client.top\n"
                      f"print(sorted(m for m in {MODEL_SIDE!r} if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_client_commands_import_no_model_side(server, tmp_path):
    # The CLI in a fresh interpreter runs each client command against the fake server of this
    # module (the server side, with torch, lives in the test process), then reports what it imported.
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from chatforge.cli import app\n"
        "runner, codes = CliRunner(), {}\n"
        f"target = {server.target!r}\n"
        "for name, args in [('health', ['health', target]),\n"
        "                   ('chat', ['chat', target, '-m', 'hello', '--max-new-tokens', '2']),\n"
        "                   ('loadtest', ['loadtest', target, '--rpc', 'classify', '-n', '2']),\n"
        "                   ('top', ['top', '127.0.0.1:1', '--count', '1'])]:\n"
        "    r = runner.invoke(app, args)\n"
        "    codes[name] = r.exit_code\n"
        f"print(json.dumps({{'codes': codes, 'imported': [m for m in {MODEL_SIDE!r} if m in sys.modules]}}))\n"
    )
    r = _fresh_python(f"exec(open({str(script)!r}).read())")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # health, chat and loadtest really talked to the server; top found no metrics endpoint (exit 1).
    assert out["codes"] == {"health": 0, "chat": 0, "loadtest": 0, "top": 1}, out
    assert out["imported"] == [], out


def test_a_non_ascii_session_id_is_sent_in_the_request_and_stored(tmp_path):
    """gRPC refuses a header value outside printable ASCII (the call failed INTERNAL "Invalid metadata"
    before the request left the client); the id travels in ReplyRequest.session_id, which is UTF-8."""
    from chatforge.serving.store import ConversationStore

    store = ConversationStore(f"sqlite:///{tmp_path / 'turns.db'}")
    with ServerThread(make_engine(), store=store) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()
        assert client.reply("hi", session_id="사용자-1", max_new_tokens=2)
        assert client.reply("hi again", session_id="user-2", max_new_tokens=2)
    assert [r["user_text"] for r in store.session("사용자-1")] == ["hi"]
    assert [r["user_text"] for r in store.session("user-2")] == ["hi again"]
    store.close()
