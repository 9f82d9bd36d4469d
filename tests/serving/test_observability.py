"""Structured logging: JSON lines with request context, human format, idempotence, secrets, privacy."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime

import pytest

from chatforge.context import request_id_var, session_id_var
from chatforge.serving.observability import configure_logging, mask_secrets, redact_text
from chatforge.settings import Settings


@pytest.fixture()
def logger(isolated_logger):
    return isolated_logger


def _ours(lg: logging.Logger) -> list[logging.Handler]:
    # pytest may attach its own capture handlers; count only the ones configure_logging installs.
    return [h for h in lg.handlers if getattr(h, "_chatforge_handler", False)]


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_line_carries_context_and_extras(logger, capsys):
    configure_logging(Settings(env="test"), logger=logger)
    rid, sid = request_id_var.set("req-1"), session_id_var.set("sess-9")
    try:
        logger.info("rpc done", extra={"rpc": "Chat", "model": "gpt-tiny", "latency_ms": 12.5, "status": "OK"})
    finally:
        request_id_var.reset(rid)
        session_id_var.reset(sid)
    logger.info("outside a request")
    first, second = _json_lines(capsys.readouterr().err)
    assert first["event"] == "rpc done" and first["level"] == "INFO" and first["logger"] == logger.name
    assert (first["request_id"], first["session_id"]) == ("req-1", "sess-9")
    assert (first["rpc"], first["model"], first["latency_ms"], first["status"]) == ("Chat", "gpt-tiny", 12.5, "OK")
    assert datetime.fromisoformat(first["time"]).tzinfo is not None
    assert second["request_id"] is None and second["session_id"] is None


def test_exception_is_one_json_line(logger, capsys):
    configure_logging(Settings(env="test"), logger=logger)
    try:
        raise ValueError("bad input")
    except ValueError:
        logger.exception("handler failed")
    (line,) = _json_lines(capsys.readouterr().err)
    assert line["level"] == "ERROR" and "ValueError: bad input" in line["exc"]


def test_configure_twice_does_not_duplicate(logger, capsys):
    settings = Settings(env="test")
    configure_logging(settings, logger=logger)
    configure_logging(settings, logger=logger)
    logger.warning("once")
    assert len(_json_lines(capsys.readouterr().err)) == 1
    assert len(_ours(logger)) == 1


def test_foreign_handlers_are_kept(logger):
    foreign = logging.NullHandler()
    logger.addHandler(foreign)
    configure_logging(Settings(env="test"), logger=logger)
    configure_logging(Settings(env="test"), logger=logger)
    assert foreign in logger.handlers and len(_ours(logger)) == 1


def test_level_from_settings(logger, capsys):
    configure_logging(Settings(env="test", log_level="warning"), logger=logger)
    logger.info("hidden")
    logger.warning("shown")
    assert [x["event"] for x in _json_lines(capsys.readouterr().err)] == ["shown"]


def test_human_format(logger, capsys):
    configure_logging(Settings(env="test", log_format="human"), logger=logger)
    token = request_id_var.set("abc123")
    try:
        logger.info("loaded model", extra={"model": "bert-tiny"})
    finally:
        request_id_var.reset(token)
    line = capsys.readouterr().err.strip()
    assert "INFO" in line and "[req=abc123]" in line and "loaded model" in line and "model=bert-tiny" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_secrets_are_masked_in_message_and_extras(logger, capsys):
    configure_logging(Settings(env="test"), logger=logger)
    logger.info("calling upstream with Authorization: Bearer abc.def-123 and token=%s", "tok-SECRET")
    logger.info(
        "alert config",
        extra={"api_key": "sk-live-42", "webhook_url": "https://hooks.slack.com/services/T0/B0/XYZ",
               "note": "posting to https://wh.jandi.com/connect-api/webhook/11/deadbeef", "prompt_tokens": 12},
    )
    err = capsys.readouterr().err
    for secret in ("abc.def-123", "tok-SECRET", "sk-live-42", "T0/B0/XYZ", "deadbeef"):
        assert secret not in err
    first, second = _json_lines(err)
    assert "***" in first["event"]
    assert second["api_key"] == "***" and second["webhook_url"] == "***"
    assert second["prompt_tokens"] == 12  # counters named *_tokens are not secrets


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ('{"token": "t-1"}', "t-1"),
        ("authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("x-api-key: k-77", "k-77"),
        ("password = hunter2", "hunter2"),
        # one per branch of the three patterns, so the quick pre-check (_SUSPECT) never lets one through
        ("Authorization: x9", "x9"), ("api_key=k1", "k1"), ("apikey: k2", "k2"), ("API-KEY=k3", "k3"),
        ("client_secret=s4", "s4"), ("passwd=p5", "p5"), ("PASSWORD: p6", "p6"), ("refresh_token=r7", "r7"),
        ("sent Bearer abc.def", "abc.def"), ("BASIC dXNlcjo=", "dXNlcjo="),
        ("post https://hooks.slack.com/services/T0/B0/XYZ", "T0/B0/XYZ"),
        ("post https://wh.jandi.com/connect-api/webhook/1/abc", "connect-api/webhook/1/abc"),
        ("post http://my-webhook.internal:8080/hook/s3cr3t", "hook/s3cr3t"),
    ],
)
def test_mask_secrets_forms(text, secret):
    masked = mask_secrets(text)
    assert secret not in masked and "***" in masked


def test_mask_secrets_leaves_ordinary_text():
    text = "generated_tokens=40 prompt_tokens=12 model=gpt"
    assert mask_secrets(text) == text


def test_redact_text_hides_user_text_by_default():
    assert redact_text("my phone is 010-1234", Settings(env="test")) == "<redacted 20 chars>"
    assert redact_text(None, Settings(env="test")) == ""


def test_redact_text_truncates_when_allowed():
    s = Settings(env="test", log_user_text=True, log_user_text_chars=5)
    assert redact_text("hello", s) == "hello"
    assert redact_text("hello world", s) == "hello…(+6 chars)"


def test_production_log_file_is_json_and_rotates(logger, tmp_path, capsys):
    path = tmp_path / "sub" / "server.log"
    s = Settings(env="production", log_format="human", log_file=path, log_file_max_bytes=400, log_file_backups=2)
    handlers = configure_logging(s, logger=logger)
    for i in range(20):
        logger.info("event %d", i, extra={"i": i})
    for h in handlers:
        h.flush()
    lines = _json_lines(path.read_text(encoding="utf-8"))  # file is JSON even when stderr is human
    assert lines and lines[-1]["event"] == "event 19"
    assert (tmp_path / "sub" / "server.log.1").exists() and not (tmp_path / "sub" / "server.log.3").exists()
    assert "event 19" in capsys.readouterr().err


# ------------------------------------------- a served process: one handler, one line per event (issue #12, item 12)
@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from chatforge.config import validate_config
    from chatforge.training.run import run_experiment

    tmp = tmp_path_factory.mktemp("cls")
    cfg = validate_config({
        "name": "tiny-log", "seed": 1,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.1, "stratify": True},
        "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": {"family": "transformer", "task": "classification", "d_model": 16, "n_heads": 2, "d_ff": 32,
                  "dropout": 0.0, "num_encoder_layers": 1},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 8, "max_source_len": 16},
        "tracking": {"enabled": False},
        "output": {"dir": str(tmp / "runs")},
    })
    return run_experiment(cfg, run_dir=tmp / "run").bundle_dir


# HumanFormatter: "time LEVEL logger [req=… sess=…] event key=value …"
_HUMAN_LINE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+\+00:00 (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+ "
                         r"(\[[^]]*\] )?(?P<event>.+?)(?= \w+=|$)")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "human"])
def test_served_call_logs_each_event_once_in_the_chosen_format(tiny_classifier, tmp_path, fmt):
    import os
    import signal
    import subprocess
    import sys
    import time

    from chatforge.client import ChatbotClient

    port_file = tmp_path / "port"
    env = {**os.environ, "CHATFORGE_ENV": "test", "CHATFORGE_LOG_FORMAT": fmt, "CHATFORGE_LOG_LEVEL": "INFO"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatforge.cli", "serve", "--model", f"intents={tiny_classifier}", "--port", "0",
         "--port-file", str(port_file), "--grace", "5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "server did not write its port file in time"
            time.sleep(0.05)  # polling the file the server writes once SERVING; bounded by the deadline
        with ChatbotClient(f"127.0.0.1:{port_file.read_text().strip()}", timeout=30) as client:
            assert client.classify("hello there").label
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [line for line in err.splitlines() if line.strip()]
    if fmt == "json":
        docs = [json.loads(line) for line in lines]  # every line is one JSON object
        names = [d["event"] for d in docs]
    else:
        matches = [_HUMAN_LINE.match(line) for line in lines]
        assert all(matches), [line for line, m in zip(lines, matches, strict=True) if not m]
        names = [m.group("event") for m in matches]
    assert "listening" in names and any("Classify" in n for n in names), names
    assert len(lines) == len(set(lines)), "a line was written twice"
    assert names.count("listening") == 1 and names.count("stopped") == 1, names


# A session id as a hostile client may send it (ReplyRequest.session_id and the HTTP body's "user" take any text
# but NUL, up to 128 characters): a forged JSON line, a carriage return, terminal escapes (clear the screen, set
# the window title), and the characters that end a line for str.splitlines and some log shippers.
HOSTILE_SESSION_ID = ('a\n{"level": "CRITICAL", "event": "forged"}\r\x1b[2J\x1b]0;pwned\x07'
                      " x\u2028y\u2029z\x85w\x7f")


@pytest.mark.parametrize("fmt", ["json", "human"])
def test_a_client_chosen_session_id_cannot_break_or_forge_log_lines(logger, capsys, fmt):
    """Before: the human format wrote the id as it came (a forged line, the operator's terminal cleared and
    retitled); the JSON format left U+2028, U+2029 and NEL raw, so a reader splitting lines as Python does
    (str.splitlines, this file's _json_lines) cut one event in two."""
    configure_logging(Settings(env="test", log_format=fmt), logger=logger)
    sid = session_id_var.set(HOSTILE_SESSION_ID)
    try:
        logger.info("rpc done", extra={"session_id": HOSTILE_SESSION_ID, "model": "m\nforged=1"})
    finally:
        session_id_var.reset(sid)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert not any(c in err for c in "\r\x1b\x07\x7f\x85\u2028\u2029")
    if fmt == "json":
        doc = json.loads(lines[0])
        assert doc["session_id"] == HOSTILE_SESSION_ID and doc["model"] == "m\nforged=1"  # the same text, escaped
    else:
        assert 'sess=a\\n{"level"' in lines[0] and "\\x1b[2J" in lines[0] and "model=m\\nforged=1" in lines[0]
