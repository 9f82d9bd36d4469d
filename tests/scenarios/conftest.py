"""Session fixtures of the container tests: the engine checked once and the serving image built once, for
test_image.py and test_compose_stack.py both."""

from __future__ import annotations

import subprocess
import time

import pytest
from tests.container_helpers import BASE, build, check_engine, size_mb
from tests.deploy_helpers import say


@pytest.fixture(scope="session")
def engine():
    """The container engine, checked; at the end, the untagged images that earlier runs left behind are removed
    (each run re-tags the two images and leaves the old ones and their build stages untagged: over many runs they
    filled a 250 GB disk, and a build then failed writing a layer). This run's own stay as the next build's cache."""
    started = int(time.time())
    yield check_engine()
    subprocess.run(["podman", "image", "prune", "-f", "--filter", f"until={started}"], capture_output=True,
                   timeout=300)


@pytest.fixture(scope="session")
def serving_image(engine, pytestconfig) -> str:
    tag = "localhost/chatforge:ci"
    took = build("deploy/Dockerfile", tag)
    say(pytestconfig, f"\nserving image {tag}: {size_mb(tag):.0f} MB, built in {took:.0f} s on {BASE}")
    return tag
