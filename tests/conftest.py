"""Test-suite wide settings.

The suite runs in test mode (CHATFORGE_ENV=test): no production sinks (log files,
alert webhooks, the production conversation store) are ever written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["CHATFORGE_ENV"] = "test"
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    # Tiny models: one thread is faster and deterministic. They ran ~8x faster on one thread than
    # on two while other test processes shared the 2 cores (13 vs 106 ms per training step).
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _no_cli_log_handlers_leak():
    """The CLI installs a rich handler on the root logger; keep it from outliving a CLI test."""
    import logging

    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in before:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.fixture
def page():
    """A page of Debian's Chromium driven by Playwright (a phone-sized viewport, Korean locale); skips without either.
    Shared by the chat-page tests (tests/scenarios and tests/serving)."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    from tests.scenarios.test_http_browser import CHROMIUM_ARGS, _chromium

    exe = _chromium()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 390, "height": 720}, device_scale_factor=2,
                                          locale="ko-KR")
            yield context.new_page()
        finally:
            browser.close()
