"""Failover behind the real HAProxy with the shipped deploy/haproxy/haproxy.cfg (scripts/failover_demo.py).

Two real `chatforge serve` replicas (tiny bundles) in their own network namespaces where they can be
made (loopback addresses otherwise), 8 callers sending 1,000 Classify + 200 short Reply calls through
HAProxy, and at the halfway mark one replica is drained (SIGTERM), killed (SIGKILL, then restarted) or
hung (SIGSTOP, SIGCONT later): over gRPC in TCP and in HTTP/2 mode (ChatbotClient), and over the HTTP
API (HttpChatClient: /v1/classify and streamed /v1/chat/completions, HAProxy's chatforge_http backend).
The figures are printed (the CI log shows them) and asserted, the same in every mode:

- drain: no failed call at all, the replica is taken out within 2 s as NOLB (HAProxy's drain state: no
  new calls, open streams carry on; deploy/haproxy/haproxy.cfg turns its 503 into 404) and exits 0;
- kill: no failed call except a Reply stream that was already under way on the killed replica (its
  tokens were delivered; nothing can resume it), detached within 2 s, re-attached after its restart.
  Over HTTP that takes both layers: HAProxy re-sends what the killed replica never answered, and
  HttpChatClient what it cut (uvicorn writes a status line and its body separately);
- hang: no failure of a call made after HAProxy marked the replica down, which takes at most 2 s.
"""

from __future__ import annotations

import shutil
import sys

import pytest
from tests.deploy_helpers import REPO, train_tiny_bundles

pytestmark = pytest.mark.slow

sys.path.insert(0, str(REPO / "scripts"))
import failover_demo as fd  # noqa: E402

DETACH_BOUND_S = 2.0  # the bound for a hung replica; drains and kills are detached sooner


@pytest.fixture(scope="module")
def failover(tmp_path_factory):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (tools/ci_install_containers.sh installs Debian's package)")
    tmp = tmp_path_factory.mktemp("failover")
    chat, intent = train_tiny_bundles(tmp)
    with fd.Failover(chat, intent, tmp) as f:
        print(f"\nreplicas: {f.topo.kind} {f.topo.addrs}")
        yield f


@pytest.mark.parametrize("mode", ["tcp", "h2", "http"])
def test_failover_behind_haproxy(failover, mode, capsys):
    results = [failover.run(mode, scenario) for scenario in fd.SCENARIOS]
    with capsys.disabled():
        print(f"\nHAProxy failover, {mode} mode ({failover.topo.kind}); machine: {fd.machine()}")
        print(fd.table(results))
        for r in results:
            for e in r.errors:
                print(f"  {r.scenario}: {e}")
    by = {r.scenario: r for r in results}
    for r in results:
        assert r.calls == fd.N_CLASSIFY + fd.N_REPLY
        # The victim really served part of the load before the event (else nothing was tested).
        assert r.served_by_victim_before > 0, r
        assert r.detach_s is not None and r.detach_s <= DETACH_BOUND_S, r

    assert by["drain"].failed == 0, by["drain"].errors
    assert by["drain"].exit_code == 0
    # Taken out as NOLB (open streams carry on), not DOWN (which closes its connections).
    assert by["drain"].detach_state == "NOLB", by["drain"]
    assert by["kill"].detach_state == by["hang"].detach_state == "DOWN"

    kill = by["kill"]
    assert kill.failed == kill.failed_started_replies, kill.errors  # only streams already under way
    assert kill.reattach_s is not None, "the restarted replica was never marked UP again"

    hang = by["hang"]
    assert hang.failed_after_detach == 0, hang.errors
    assert hang.reattach_s is not None, "the resumed replica was never marked UP again"
