"""A planned drain (SIGTERM: a rolling deploy, a scale-down) is announced as INFO, not paged as CRITICAL: readiness
goes NOT_SERVING only when the server drains, and every replica of every deploy sent "CRITICAL: health of
chatforge.v1.Chatbot is NOT_SERVING". A NOT_SERVING without a reason is still critical."""

from __future__ import annotations

from tests.serving.test_alerts import Receiver
from tests.serving_fakes import ServerThread, make_engine

from chatforge.serving.alerts import AlertManager


def _bodies_about(receiver: Receiver, words: str) -> list[dict]:
    return [b for b in receiver.bodies if words in b["body"]]


def test_a_drain_is_announced_as_info_with_its_reason():
    receiver = Receiver()
    try:
        alerts = AlertManager(receiver.url, "jandi", server_name="replica-1", window_seconds=0)
        with ServerThread(make_engine(), alerts=alerts) as st:
            st.wait_serving()
        assert alerts.flush(5.0)
        (drain,) = _bodies_about(receiver, "NOT_SERVING")
        assert drain["body"] == "[replica-1] INFO: health of chatforge.v1.Chatbot is NOT_SERVING"
        assert "reason: draining" in drain["connectInfo"][0]["description"]
        alerts.close()
    finally:
        receiver.close()


def test_a_not_serving_without_a_reason_is_still_critical():
    receiver = Receiver()
    try:
        with AlertManager(receiver.url, "jandi", server_name="r", window_seconds=0) as alerts:
            alerts.health_changed("chatforge.v1.Chatbot", "NOT_SERVING")
        (body,) = _bodies_about(receiver, "NOT_SERVING")
        assert body["body"] == "[r] CRITICAL: health of chatforge.v1.Chatbot is NOT_SERVING"
    finally:
        receiver.close()


def test_a_server_that_stops_because_its_models_failed_to_load_still_pages():
    def loader():
        raise ValueError("bundle 'chat' not found")

    receiver = Receiver()
    try:
        alerts = AlertManager(receiver.url, "jandi", server_name="replica-2", window_seconds=0)
        st = ServerThread(loader, alerts=alerts)
        with st:
            st.join()
        assert alerts.flush(5.0)
        (stop,) = _bodies_about(receiver, "NOT_SERVING")
        assert stop["body"] == "[replica-2] CRITICAL: health of chatforge.v1.Chatbot is NOT_SERVING"
        alerts.close()
    finally:
        receiver.close()
