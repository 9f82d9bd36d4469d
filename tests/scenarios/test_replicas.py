"""Two replicas as separate processes; kill -9 one of them while a client runs 1,000 unary calls.

Every call must succeed: the client's round_robin skips the dead replica once its connection
breaks (client-side health checking watches readiness too), and calls that were on their way
to it when it died are retried (UNAVAILABLE is retryable and nothing was committed).

The replicas are this file run as a script (see ``_replica_main``): fake models, no torch
model load, so a replica is up in about a second. Each hosts a classifier named after the
replica, so ``ListModels`` says which replica answered.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WAIT = 10.0
CALLS = 1000
KILL_AFTER = 500  # calls finished before the kill (a counter, not a timer)
THREADS = 4  # several callers, so the kill lands while calls are in flight


def _start_replica(name: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "CHATFORGE_ENV": "test"}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), name], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    # The replica prints its port once SERVING; wait for that line with a deadline.
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout=60.0):
            proc.kill()
            proc.wait(WAIT)
            raise AssertionError(f"replica {name} did not announce its port within 60 s")
        line = proc.stdout.readline().strip()
    finally:
        sel.close()
    if not line.isdigit():
        proc.kill()
        proc.wait(WAIT)
        raise AssertionError(f"replica {name} exited or printed {line!r} instead of its port")
    return proc, int(line)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)


def test_kill_9_one_of_two_replicas_fails_no_call():
    from chatforge.client import ChatbotClient

    a, port_a = _start_replica("a")
    try:
        b, port_b = _start_replica("b")
    except BaseException:
        _stop(a)
        raise
    procs = {"a": a, "b": b}
    answers: list[tuple[int, str]] = []  # (call number, replica), in completion order
    errors: list[BaseException] = []
    lock = threading.Lock()
    next_call = 0
    killed_at: int | None = None  # answers recorded when the kill happened

    try:
        target = f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}"
        with ChatbotClient(target, timeout=WAIT) as client:
            assert client.health_check  # several addresses: round_robin + healthCheckConfig
            client.wait_for_ready(WAIT)

            def caller() -> None:
                nonlocal next_call, killed_at
                while True:
                    with lock:
                        if next_call >= CALLS:
                            return
                        i = next_call
                        next_call += 1
                    try:
                        models = client.list_models()
                    except BaseException as e:  # noqa: BLE001 - recorded and asserted below
                        with lock:
                            errors.append(e)
                        continue
                    [replica] = [m.name for m in models if m.task == "classification"]
                    with lock:
                        answers.append((i, replica))
                        if killed_at is None and len(answers) == KILL_AFTER:
                            killed_at = len(answers)
                            # SIGKILL: no drain, no GOAWAY; the client only sees the socket break.
                            procs["a"].kill()

            threads = [threading.Thread(target=caller, daemon=True) for _ in range(THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120.0)
            assert not any(t.is_alive() for t in threads), "callers did not finish within 120 s"
    finally:
        for p in procs.values():
            if p is a:
                if p.poll() is None:
                    p.kill()
                p.wait(WAIT)
            else:
                _stop(p)

    assert a.returncode == -signal.SIGKILL  # it really was killed, not drained
    assert not errors, f"{len(errors)} calls failed, e.g. {errors[:3]}"
    assert len(answers) == CALLS and sorted(i for i, _ in answers) == list(range(CALLS))
    before = [r for _, r in answers[:killed_at]]
    after = [r for _, r in answers[killed_at:]]
    assert {"a", "b"} <= set(before), "round_robin did not use both replicas before the kill"
    assert before.count("a") > KILL_AFTER // 4 and before.count("b") > KILL_AFTER // 4
    # At most the calls already in flight can have been answered by "a" after the kill.
    assert after.count("a") <= THREADS and after.count("b") >= CALLS - KILL_AFTER - THREADS


ROUNDS = 3  # the kill lands at a different moment each time
MIXED_CALLS, MIXED_KILL_AFTER, MIXED_THREADS = 400, 150, 8


def test_kill_9_with_8_callers_fails_no_classify_and_no_unstarted_reply():
    """8 callers share one round_robin client; Reply, Classify and ListModels calls interleave; one
    replica is SIGKILLed mid-run, ROUNDS times. Classify and ListModels (idempotent) and a Reply that
    has received no token yet are sent again to the other replica; only a Reply already streaming
    from the dead replica may fail."""
    for round_ in range(ROUNDS):
        _kill_one_of_two_under_mixed_load(round_)


def _kill_one_of_two_under_mixed_load(round_: int) -> None:
    from chatforge.client import ChatbotClient, ChatbotError

    a, port_a = _start_replica("a")
    try:
        b, port_b = _start_replica("b")
    except BaseException:
        a.kill()
        a.wait(WAIT)
        raise
    failures: list[tuple[str, int, BaseException]] = []  # (rpc, tokens received before the error, error)
    answered: list[str] = []  # the replica that answered each ListModels
    labels: list[str] = []
    replies: list[int] = []  # tokens of each completed Reply
    lock = threading.Lock()
    counter = {"next": 0, "done": 0}
    try:
        with ChatbotClient(f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}", timeout=WAIT) as client:
            client.wait_for_ready(WAIT)
            # Both replicas in the rotation before the load starts (the kill must hit one in use).
            seen: set[str] = set()
            for _ in range(200):
                seen |= {m.name for m in client.list_models() if m.task == "classification"}
                if seen == {"a", "b"}:
                    break
            assert seen == {"a", "b"}, f"round_robin used only {seen}"

            def caller() -> None:
                while True:
                    with lock:
                        if counter["next"] >= MIXED_CALLS:
                            return
                        i = counter["next"]
                        counter["next"] += 1
                    rpc = ("Reply", "Classify", "Reply", "ListModels")[i % 4]
                    tokens = 0
                    try:
                        if rpc == "Classify":
                            labels.append(client.classify("hello").label)
                        elif rpc == "ListModels":
                            models = client.list_models()
                            answered.append([m.name for m in models if m.task == "classification"][0])
                        else:
                            for chunk in client.reply_stream("hi", max_new_tokens=4):
                                tokens += 0 if chunk.is_final else 1
                            replies.append(tokens)
                    except ChatbotError as e:
                        with lock:
                            failures.append((rpc, tokens, e))
                    with lock:
                        counter["done"] += 1
                        if counter["done"] == MIXED_KILL_AFTER:
                            a.kill()  # SIGKILL with calls in flight on it

            threads = [threading.Thread(target=caller, daemon=True) for _ in range(MIXED_THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120.0)
            assert not any(t.is_alive() for t in threads), "callers did not finish within 120 s"
    finally:
        if a.poll() is None:
            a.kill()
        a.wait(WAIT)
        _stop(b)
    assert a.returncode == -signal.SIGKILL
    assert counter["done"] == MIXED_CALLS
    lost = [(rpc, tokens, str(e)) for rpc, tokens, e in failures if rpc != "Reply" or tokens == 0]
    assert not lost, f"round {round_}: {len(lost)} calls failed that could have been retried: {lost[:5]}"
    # Only Replies already streaming from the dead replica may fail: at most one per caller.
    assert len(failures) <= MIXED_THREADS
    assert len(labels) + len(answered) + len(replies) + len(failures) == MIXED_CALLS
    assert set(labels) == {"greet"} and set(replies) == {4}
    assert set(answered) <= {"a", "b"} and "b" in answered


def _replica_main(name: str) -> None:
    """Serve fake models (a classifier named ``name``) on an ephemeral port; print it once SERVING."""
    import asyncio
    import logging
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.serving_fakes import FakeClassifier, FakeGenerator

    from chatforge.serving.engine import Engine
    from chatforge.serving.server import serve

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    async def main() -> None:
        ready = asyncio.Event()
        with tempfile.TemporaryDirectory() as tmp:
            port_file = Path(tmp) / "port"

            async def announce() -> None:
                await ready.wait()
                sys.stdout.write(port_file.read_text().strip() + "\n")
                sys.stdout.flush()

            task = asyncio.get_running_loop().create_task(announce())
            engine = Engine({"echo": FakeGenerator()}, {name: FakeClassifier(name)})
            await serve(engine, "127.0.0.1", 0, grace=1.0, port_file=port_file, ready_event=ready)
            task.cancel()

    asyncio.run(main())


if __name__ == "__main__":
    _replica_main(sys.argv[1])
