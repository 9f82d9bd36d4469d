"""10,000 health checks through new short-lived clients leave open file descriptors flat.

The seed's incident: health checks that opened a connection each and never closed it, until
the process died with "Too many open files". Here every check is made by a fresh
ChatbotClient with its own TCP connection (a local subchannel pool: by default grpc shares
one connection per target across channels, which would hide a client that never closes),
against a server in this same process, so a leak on either side shows in /proc/self/fd.
"""

from __future__ import annotations

import os
import time

import pytest
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.client import ChatbotClient

pytestmark = pytest.mark.slow

CHECKS = 10_000
SLACK = 10  # grpc's pollers/wakeup fds and sockets still closing may come and go


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux) to count open fds")
def test_ten_thousand_short_lived_health_checks_leave_fds_flat():
    options = [("grpc.use_local_subchannel_pool", 1)]
    with ServerThread(make_engine()) as st:
        st.wait_serving()
        for _ in range(50):  # warm up grpc's threads, pollers and the server's first connections
            with ChatbotClient(st.target, timeout=WAIT, options=options) as client:
                client.health()
        before = _open_fds()
        samples = []
        statuses: dict[str, int] = {}
        start = time.perf_counter()
        for i in range(1, CHECKS + 1):
            with ChatbotClient(st.target, timeout=WAIT, options=options) as client:
                status = client.health("chatforge.v1.Chatbot")
            statuses[status] = statuses.get(status, 0) + 1
            if i % 1000 == 0:
                samples.append(_open_fds())
        elapsed = time.perf_counter() - start
        after = _open_fds()
    assert statuses == {"SERVING": CHECKS}
    # Flat all the way, not only at the end: a leak of one fd per 1,000 checks would show too.
    assert max(samples) - before <= SLACK and after - before <= SLACK, (
        f"open fds grew from {before} to {after} over {CHECKS} short-lived clients "
        f"(every 1,000: {samples}; {elapsed:.1f} s)"
    )
