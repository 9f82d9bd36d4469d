"""Settings from CHATFORGE_* variables, and the test-mode isolation of production sinks."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chatforge.serving.alerts import AlertManager
from chatforge.serving.observability import configure_logging
from chatforge.serving.store import ConversationStore
from chatforge.settings import DEFAULT_STORE_URL, TEST_STORE_URL, Settings, SettingsError, get_settings


def test_defaults_without_environment():
    s = Settings.from_env({})
    assert s.env == "development"
    assert s.log_format == "json" and s.log_level == "INFO"
    assert s.log_user_text is False
    assert s.alert_format == "jandi"
    assert s.effective_store_url == DEFAULT_STORE_URL
    assert s.production_sinks_enabled is True


def test_reads_prefixed_variables_case_insensitively(tmp_path):
    env = {
        "CHATFORGE_ENV": "Production",
        "CHATFORGE_LOG_FORMAT": "human",
        "CHATFORGE_LOG_LEVEL": "debug",
        "CHATFORGE_LOG_FILE": str(tmp_path / "x.log"),
        "CHATFORGE_LOG_USER_TEXT": "true",
        "CHATFORGE_ALERT_WEBHOOK_URL": "https://wh.jandi.com/connect-api/webhook/1/abc",
        "CHATFORGE_ALERT_FORMAT": "slack",
        "CHATFORGE_STORE_URL": "postgresql://u@db/chat",
        "CHATFORGE_METRICS_PORT": "9200",
        "CHATFORGE_SOMETHING_ELSE": "ignored",
        "CHATFORGE_SERVER_NAME": "",  # empty counts as unset
    }
    s = Settings.from_env(env)
    assert (s.env, s.log_format, s.log_level, s.alert_format) == ("production", "human", "DEBUG", "slack")
    assert s.log_user_text is True and s.metrics_port == 9200
    assert s.effective_log_file == tmp_path / "x.log"
    assert s.effective_alert_webhook_url.startswith("https://wh.jandi.com/")
    assert s.effective_store_url == "postgresql://u@db/chat"
    assert s.server_name  # hostname default


def test_overrides_win_over_environment():
    s = Settings.from_env({"CHATFORGE_ENV": "test"}, env="production")
    assert s.env == "production"


@pytest.mark.parametrize(
    ("var", "value", "allowed"),
    [
        ("CHATFORGE_ENV", "prod", "'production', 'development' or 'test'"),
        ("CHATFORGE_LOG_FORMAT", "xml", "'json' or 'human'"),
        ("CHATFORGE_ALERT_FORMAT", "teams", "'jandi' or 'slack'"),
        ("CHATFORGE_METRICS_PORT", "70000", "65535"),
        ("CHATFORGE_LOG_USER_TEXT", "maybe", "bool"),
    ],
)
def test_bad_value_names_variable_and_allowed_values(var, value, allowed):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({var: value})
    message = str(info.value)
    assert var in message and repr(value) in message and allowed in message


def test_bad_webhook_url_is_rejected_without_echoing_it():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"CHATFORGE_ALERT_WEBHOOK_URL": "ftp://secret-token-123"})
    assert "CHATFORGE_ALERT_WEBHOOK_URL" in str(info.value)
    assert "secret-token-123" not in str(info.value)


def test_direct_construction_rejects_unknown_keys():
    with pytest.raises(ValueError, match="log_fmt"):
        Settings(log_fmt="json")


def test_test_env_turns_production_sinks_off(tmp_path):
    s = Settings(env="test", log_file=tmp_path / "x.log", alert_webhook_url="http://127.0.0.1:1/hook")
    assert s.production_sinks_enabled is False
    assert s.effective_log_file is None
    assert s.effective_alert_webhook_url is None
    assert s.effective_store_url == TEST_STORE_URL
    # An explicitly chosen store (e.g. a tmp_path database in a test) is honoured.
    assert Settings(env="test", store_url="sqlite:///x.db").effective_store_url == "sqlite:///x.db"


def test_get_settings_reads_environment_and_caches(monkeypatch):
    monkeypatch.setenv("CHATFORGE_ENV", "test")
    get_settings.cache_clear()
    try:
        first = get_settings()
        monkeypatch.setenv("CHATFORGE_ENV", "production")
        assert first.env == "test" and get_settings() is first
    finally:
        get_settings.cache_clear()


class _Receiver:
    """Records POSTs on 127.0.0.1 (a stand-in for the alert webhook)."""

    def __init__(self):
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver():
    r = _Receiver()
    yield r
    r.close()


def _raise_and_alert(manager: AlertManager) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        manager.alert_exception(e, rpc="Chat")


def test_isolation_is_real(monkeypatch, tmp_path, receiver):
    """CHATFORGE_ENV=test: a configured log file and webhook receive nothing; production: both do."""
    log_file = tmp_path / "logs" / "chatforge.log"
    monkeypatch.setenv("CHATFORGE_ENV", "test")
    monkeypatch.setenv("CHATFORGE_LOG_FILE", str(log_file))
    monkeypatch.setenv("CHATFORGE_ALERT_WEBHOOK_URL", receiver.url)
    logger = logging.getLogger("chatforge.tests.isolation")
    logger.propagate = False
    try:
        test_settings = Settings.from_env()
        handlers = configure_logging(test_settings, logger=logger)
        logger.warning("should not reach the file")
        for h in handlers:
            h.flush()
        manager = AlertManager.from_settings(test_settings, window_seconds=0)
        _raise_and_alert(manager)
        assert manager.flush(timeout=5)
        manager.close()
        assert not log_file.exists()
        assert receiver.bodies == []
        store = ConversationStore.from_settings(test_settings)
        assert store.url == TEST_STORE_URL
        store.close()

        prod_settings = Settings.from_env(env="production")
        handlers = configure_logging(prod_settings, logger=logger)
        logger.warning("reaches the file")
        for h in handlers:
            h.flush()
        manager = AlertManager.from_settings(prod_settings, window_seconds=0)
        _raise_and_alert(manager)
        assert manager.flush(timeout=5)
        manager.close()
        lines = log_file.read_text(encoding="utf-8").splitlines()
        assert [json.loads(x)["event"] for x in lines] == ["reaches the file"]
        assert len(receiver.bodies) == 1 and "RuntimeError" in receiver.bodies[0]["body"]
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        logger.propagate = True
