"""Error-rate and p99-latency alert rules: the window arithmetic, and the rules live in a server."""

from __future__ import annotations

import threading

import grpc
import pytest
from tests.scenarios.test_ops_wiring import _Receiver
from tests.serving_fakes import WAIT, FailingGenerator, FakeGenerator, GatedGenerator, ServerThread

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.serving.alert_rules import AlertRules, RollingCallStats, is_server_fault
from chatforge.serving.alerts import AlertManager
from chatforge.serving.engine import Engine
from chatforge.serving.metrics import ServingMetrics


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


@pytest.mark.parametrize(
    ("code", "deadline", "budget", "fault"),
    [
        ("DEADLINE_EXCEEDED", 0.001, 5.0, False),  # a caller that allowed 1 ms asked for what was never promised
        ("DEADLINE_EXCEEDED", 4.9, 5.0, False),
        ("DEADLINE_EXCEEDED", 5.0, 5.0, True),  # it allowed the latency the server is alerted on: the server's fault
        ("DEADLINE_EXCEEDED", 30.0, 5.0, True),
        ("DEADLINE_EXCEEDED", None, 5.0, True),  # no deadline of the caller's: the server timed the call out
        ("INTERNAL", 0.001, 5.0, True),  # only deadlines depend on what the caller allowed
        ("CANCELLED", 30.0, 5.0, False),
    ],
)
def test_a_deadline_is_the_servers_fault_only_when_the_caller_allowed_the_latency_budget(code, deadline, budget,
                                                                                         fault):
    assert is_server_fault(code, deadline, budget) is fault
    stats = RollingCallStats(60, clock=Clock(), latency_budget=budget)
    stats.record(0.001, code, deadline)
    assert stats.snapshot()[:2] == (1, int(fault))


def test_alert_rules_set_the_windows_latency_budget_to_their_p99_threshold():
    stats = RollingCallStats(60, clock=Clock())
    AlertRules(Recorder(), stats, p99_seconds=2.0)
    assert stats.latency_budget == 2.0
    stats.record(0.5, "DEADLINE_EXCEEDED", 0.5)
    stats.record(2.5, "DEADLINE_EXCEEDED", 2.5)
    assert stats.snapshot()[:2] == (2, 1)
    with pytest.raises(ValueError, match="latency_budget"):
        RollingCallStats(60, latency_budget=-1.0)


class _SignallingStats(RollingCallStats):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.recorded = threading.Event()

    def record(self, *a, **kw):
        super().record(*a, **kw)
        self.recorded.set()


@pytest.mark.parametrize(("p99_seconds", "errors", "reason"), [(60.0, 0, "short_deadline"), (0.05, 1, "deadline")])
def test_a_callers_short_deadline_does_not_count_against_the_server(p99_seconds, errors, reason):
    """A real call whose deadline (0.3 s) passes while the model is stuck: a server fault only when 0.3 s was at
    least the p99 budget; the failure metric's reason says which, so the dashboard can leave the caller's out."""
    gate = threading.Semaphore(0)
    engine = Engine({"gated": GatedGenerator(gate=gate)}, {})
    stats = _SignallingStats(60)
    rules = AlertRules(Recorder(), stats, p99_seconds=p99_seconds, min_calls=1)
    metrics = ServingMetrics(process_metrics=False)
    try:
        with ServerThread(engine, alert_rules=rules, alert_rules_interval=3600, metrics=metrics) as st, \
                ChatbotClient(st.target, timeout=0.3) as client:
            st.wait_serving()
            with pytest.raises(ChatbotError) as err:
                client.reply("hi")
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert stats.recorded.wait(WAIT)
            assert stats.snapshot()[:2] == (1, errors)
            assert metrics.value("chatforge_request_failure_total",
                                 {"rpc": "Reply", "model": "gated", "reason": reason}) == 1
            gate.release(1000)  # the stuck step ends, and the batcher drops the call it no longer has a caller for
            assert engine.stats.wait_for(lambda s: s.running == 0, WAIT)
    finally:
        gate.release(1000)
