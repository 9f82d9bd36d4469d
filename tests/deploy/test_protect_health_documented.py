"""`--protect-health` makes gRPC health need an API key, and the image's HEALTHCHECK (`chatforge health`, run inside
the container) sends one only from CHATFORGE_API_KEY: an operator who closed health and set CHATFORGE_API_KEYS had a
container that stayed unhealthy ("UNAUTHENTICATED: missing API key"), with nothing in the README saying why. Where
the README and the operations guide describe the HEALTHCHECK and --protect-health, they say what to set (and that
Kubernetes' gRPC probes send no key)."""

from __future__ import annotations

import re

from tests.deploy_helpers import REPO


def _bullet(text: str, start: str) -> str:
    """The markdown list item that starts with ``start`` (up to the next item or heading), lines joined."""
    m = re.search(re.escape(start) + r".*?(?=\n- |\n#)", text, re.S)
    assert m, start
    return " ".join(m.group(0).split())


def test_the_image_bullet_says_what_protect_health_needs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    image = _bullet(readme, "- **Serving image**")
    assert "--protect-health" in image and "CHATFORGE_API_KEY" in image, image
    security = _bullet(readme, "- **Security.**")
    assert "--protect-health" in security and "CHATFORGE_API_KEY" in security and "gRPC probes" in security, security
