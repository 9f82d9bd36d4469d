"""A load test's calls are flagged in the conversation store and left out of exports by default.

Before, ``chatforge loadtest`` against a server with a store wrote its synthetic messages as ordinary turns: the
next ``conversations export`` fed them into the training data, with nothing to tell them from real users.
"""

from __future__ import annotations

import json

import grpc
import pytest
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.client import ChatbotClient
from chatforge.client.loadtest import LoadTestConfig, run_load_test
from chatforge.serving.store import ConversationStore, export_store

TEXTS = ["load test message one", "load test message two"]


def _user_texts(path) -> list[str]:
    return [json.loads(line)["user_text"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_load_test_turns_are_flagged_and_left_out_of_exports(tmp_path, protocol):
    url = f"sqlite:///{tmp_path / 'turns.db'}"
    store = ConversationStore(url)
    with ServerThread(make_engine(), store=store, http_port=0) as st:
        st.wait_serving()
        target = st.target if protocol == "grpc" else f"127.0.0.1:{st.server.http.port}"
        for rpc in ("reply", "classify"):
            report = run_load_test(LoadTestConfig(target=target, rpc=rpc, requests=4, texts=TEXTS, timeout=WAIT,
                                                  max_new_tokens=2, protocol=protocol))
            assert report.ok == 4, report.error_messages()
        with ChatbotClient(st.target, timeout=WAIT) as client:  # a real user, beside the load test
            client.reply("a real question", max_new_tokens=2)
            client.classify("a real intent")
    store.close()

    with ConversationStore(url) as reader:
        rows = list(reader.iter_rows())
    assert len(rows) == 10  # every call is still stored: the write path is part of what a load test measures
    assert {r["traffic"] for r in rows if r["user_text"] in TEXTS} == {"loadtest"}
    assert [r["traffic"] for r in rows if r["user_text"].startswith("a real")] == [None, None]

    out = tmp_path / "turns.jsonl"
    assert export_store(url, out) == 2
    assert _user_texts(out) == ["a real question", "a real intent"]
    assert export_store(url, out, include_synthetic=True) == 10


def test_an_unknown_traffic_mark_is_refused_naming_the_header(tmp_path):
    store = ConversationStore(f"sqlite:///{tmp_path / 'turns.db'}")
    with ServerThread(make_engine(), store=store) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT, metadata=[("x-chatforge-traffic", "lodtest")]) as client:
            with pytest.raises(Exception) as err:
                client.classify("hello")
    store.close()
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-chatforge-traffic header 'lodtest' is unknown; allowed: loadtest" in err.value.details


def test_the_cli_export_leaves_synthetic_turns_out_unless_asked(tmp_path):
    from typer.testing import CliRunner

    from chatforge.cli import app
    from chatforge.serving.store import Turn

    url = f"sqlite:///{tmp_path / 'turns.db'}"
    with ConversationStore(url) as store:
        store.record(Turn(request_id="real", user_text="real"))
        store.record(Turn(request_id="synthetic", user_text="synthetic", traffic="loadtest"))
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["conversations", "export", "--url", url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _user_texts(out) == ["real"]
    result = CliRunner().invoke(app, ["conversations", "export", "--url", url, "--out", str(out),
                                      "--include-synthetic"])
    assert result.exit_code == 0, result.output
    assert _user_texts(out) == ["real", "synthetic"]
