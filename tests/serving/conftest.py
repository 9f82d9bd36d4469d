"""What the HTTP surface's tests share: a server with the HTTP API on, and its base URL."""

from __future__ import annotations

import httpx
import pytest
from tests.serving_fakes import WAIT, ServerThread, make_engine


def base_url(st: ServerThread) -> str:
    return f"http://127.0.0.1:{st.server.http.port}"


@pytest.fixture
def served():
    """A ``ServerThread`` over the fake engine with the HTTP API on a free port, and an httpx client for it."""
    with ServerThread(make_engine(), http_port=0) as st:
        st.wait_serving()
        with httpx.Client(base_url=base_url(st), timeout=WAIT) as http:
            yield st, http
