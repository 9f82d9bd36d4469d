"""Bytes that are no valid message, sent on a client-streaming RPC (reflection's ServerReflectionInfo, open without
an API key), are INVALID_ARGUMENT with a warning, as on every unary-request RPC: the undecodable message reached the
reflection servicer, which failed INTERNAL with an ERROR traceback and raised a critical webhook alert, so any
anonymous client could page the on-call engineer at will."""

from __future__ import annotations

import logging

import grpc
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.client import ChatbotClient

REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


class RecordingAlerts:
    def __init__(self) -> None:
        self.exceptions: list[BaseException] = []

    def alert_exception(self, exc, **_) -> None:
        self.exceptions.append(exc)

    def health_changed(self, *_, **__) -> None:
        pass

    def flush(self, timeout: float) -> bool:
        return True


def test_garbage_on_the_reflection_stream_is_invalid_argument_not_an_alert(caplog):
    alerts = RecordingAlerts()
    with ServerThread(make_engine(), alerts=alerts) as st:
        st.wait_serving()
        with caplog.at_level(logging.WARNING, logger="chatforge.serving.interceptors"), \
                grpc.insecure_channel(st.target) as channel:
            call = channel.stream_stream(REFLECTION)  # no serializers: raw bytes
            try:
                list(call(iter([b"\xff\xff\xff"]), timeout=WAIT))
                raise AssertionError("the server answered garbage")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
                assert e.details() == "request is not a valid grpc.reflection.v1alpha.ServerReflectionRequest"
        with ChatbotClient(st.target, timeout=WAIT) as client:
            assert client.reply("hi")  # still serving
    assert alerts.exceptions == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("malformed request to " + REFLECTION in r.getMessage() for r in caplog.records)
