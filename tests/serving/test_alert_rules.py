"""Error-rate and p99-latency alert rules: the window arithmetic, and the rules live in a server."""

from __future__ import annotations

import pytest
from tests.scenarios.test_ops_wiring import _Receiver
from tests.serving_fakes import WAIT, FailingGenerator, FakeGenerator, ServerThread

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.serving.alert_rules import AlertRules, RollingCallStats
from chatforge.serving.alerts import AlertManager
from chatforge.serving.engine import Engine


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Recorder:
    """Stands in for AlertManager: records what the rules asked it to check."""

    def __init__(self):
        self.calls = []

    def check_error_rate(self, errors, total, threshold):
        self.calls.append(("error_rate", errors, total))
        return errors / total > threshold

    def check_latency_p99(self, p99, threshold):
        self.calls.append(("latency_p99", p99))
        return p99 > threshold


def test_window_counts_server_faults_only_and_forgets_old_calls():
    clock = Clock()
    stats = RollingCallStats(60, clock=clock)
    for code in ("OK", "OK", "INTERNAL", "INVALID_ARGUMENT", "UNAVAILABLE", "CANCELLED"):
        stats.record(0.1, code)
    assert stats.snapshot()[:2] == (6, 2)  # INVALID_ARGUMENT and CANCELLED are the caller's
    clock.t += 61
    stats.record(0.2, "OK")
    assert stats.snapshot() == (1, 0, 0.2)


def test_p99_is_nearest_rank():
    stats = RollingCallStats(60, clock=Clock())
    for ms in range(1, 101):  # 1..100 ms
        stats.record(ms / 1000, "OK")
    assert stats.snapshot()[2] == pytest.approx(0.099)


def test_rules_fire_on_breach_and_stay_quiet_below_min_calls():
    stats = RollingCallStats(60, clock=Clock())
    rec = Recorder()
    rules = AlertRules(rec, stats, error_rate=0.1, p99_seconds=1.0, min_calls=10)
    for _ in range(5):
        stats.record(2.0, "INTERNAL")
    assert rules.check() == [] and rec.calls == []  # 5 calls say too little
    for _ in range(15):
        stats.record(0.1, "OK")
    assert rules.check() == ["error_rate", "latency_p99"]  # 25% errors; p99 2 s
    with pytest.raises(ValueError, match="error_rate"):
        AlertRules(rec, stats, error_rate=1.5)


def test_server_error_rate_rule_posts_one_alert():
    with _Receiver() as rx:
        alerts = AlertManager(rx.url, "slack", server_name="test-host", window_seconds=0)
        rules = AlertRules(alerts, RollingCallStats(60), error_rate=0.2, p99_seconds=60.0, min_calls=10)
        engine = Engine({"ok": FakeGenerator("ok"), "bad": FailingGenerator()}, {})
        with ServerThread(engine, alert_rules=rules, alert_rules_interval=3600) as st, \
                ChatbotClient(st.target, timeout=WAIT) as client:
            st.wait_serving()
            for _ in range(6):
                client.reply("hi", model="ok")
            for _ in range(6):
                with pytest.raises(ChatbotError):
                    client.reply("hi", model="bad")
            assert rules.stats.snapshot()[:2] == (12, 6)
            assert st.run(_check(rules)) == ["error_rate"]
            assert alerts.flush(WAIT)
        alerts.close()
    rate_posts = [b for _, b in rx.posts if "error rate above threshold" in str(b)]
    assert len(rate_posts) == 1 and "6 of 12" in str(rate_posts[0])


async def _check(rules):
    return rules.check()
