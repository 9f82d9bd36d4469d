"""deploy/docker-compose.yml's ``postgres`` profile as an operator runs it: both replicas write their conversations
to one PostgreSQL (the compose file's own service, a stand-in built from Debian's postgresql-15 where no registry
serves the upstream image), and a restart of that database loses no turn while the replicas go on answering.

Before, the store tried a failed batch three times within 0.35 s and then dropped it, so every turn served while
PostgreSQL restarted was lost; a replica whose database was not up yet failed at start-up.
"""

from __future__ import annotations

import secrets
import uuid

import pytest
from tests.compose_helpers import running_stack
from tests.container_helpers import podman
from tests.deploy_helpers import say, wait_for

from chatforge.client import ChatbotClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pg_stack(serving_image, tmp_path_factory, pytestconfig):
    password = secrets.token_hex(8)
    env = {"CHATFORGE_PG_PASSWORD": password,
           "CHATFORGE_STORE_URL": f"postgresql+psycopg://chatforge:{password}@postgres/chatforge"}
    with running_stack(serving_image, tmp_path_factory.mktemp("compose-pg"), pytestconfig, profiles=("postgres",),
                       env=env, services=("haproxy", "prometheus", "postgres")) as st:
        yield st


def _rows(stack, session: str) -> int:
    """Turns of ``session`` in the stack's PostgreSQL, read with psql inside its container (-1: not answering)."""
    r = podman("exec", stack.container("postgres"), "psql", "-U", "chatforge", "-d", "chatforge", "-tAc",
               f"SELECT count(*) FROM turns WHERE session_id = '{session}'", check=False)
    return int(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip().isdigit() else -1


def _store_metrics(stack, replica: str) -> dict[str, float]:
    """The replica's chatforge_store_* samples, read from its own /metrics inside its container (not published)."""
    probe = ("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=5)"
             ".read().decode())")
    text = podman("exec", stack.container(replica), "python3", "-c", probe).stdout
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("chatforge_store_")}


def _chat(stack, session: str, n: int) -> None:
    with ChatbotClient(stack.target("GRPC_H2"), timeout=30) as client:  # HTTP/2 mode: calls spread over both
        for i in range(n):
            chunks = list(client.reply_stream(f"안녕하세요 {i}", model="chat", max_new_tokens=4, session_id=session))
            assert chunks[-1].is_final


def test_both_replicas_store_turns_in_the_shared_postgres(pg_stack):
    session = uuid.uuid4().hex
    _chat(pg_stack, session, 8)
    wait_for(lambda: _rows(pg_stack, session) == 8, 30, "8 turns in PostgreSQL")
    r = podman("exec", pg_stack.container("postgres"), "psql", "-U", "chatforge", "-d", "chatforge", "-tAc",
               f"SELECT count(DISTINCT request_id) FROM turns WHERE session_id = '{session}'")
    assert r.stdout.strip() == "8"


def test_a_postgres_restart_loses_no_turn_and_the_replicas_keep_answering(pg_stack, pytestconfig):
    session = uuid.uuid4().hex
    _chat(pg_stack, session, 3)
    wait_for(lambda: _rows(pg_stack, session) == 3, 30, "3 turns in PostgreSQL before the restart")
    pg_stack.compose("stop", "postgres", timeout=120)
    _chat(pg_stack, session, 6)  # the database is down: every call must still be answered
    pg_stack.compose("start", "postgres", timeout=120)
    took = wait_for(lambda: _rows(pg_stack, session) == 9, 60, "all 9 turns in PostgreSQL after its restart",
                    interval=0.5)
    logs = pg_stack.logs("chatbot-a") + pg_stack.logs("chatbot-b")
    assert "conversation store unavailable" in logs and "available again" in logs, logs[-3000:]
    # what an operator's dashboard shows after it: both replicas' stores up, nothing pending, nothing lost
    seen = [_store_metrics(pg_stack, r) for r in ("chatbot-a", "chatbot-b")]
    for m in seen:
        assert m["chatforge_store_available"] == 1.0 and m["chatforge_store_pending_turns"] == 0, m
        assert m['chatforge_store_turns_total{outcome="failed"}'] == 0, m
        assert m['chatforge_store_turns_total{outcome="dropped"}'] == 0, m
    assert sum(m['chatforge_store_turns_total{outcome="written"}'] for m in seen) >= 9
    say(pytestconfig, f"\npostgres restart: 6 turns held by the replicas, all written {took:.1f} s after it was up")
