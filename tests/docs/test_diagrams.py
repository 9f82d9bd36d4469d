"""docs/diagrams: every PlantUML source has a committed SVG and PNG that are current, and
docs/architecture.md shows them.

"Current" is decided without mtimes (git does not keep them): the source's sha256 must match the one
`make diagrams` recorded when it rendered (SOURCES.sha256), and where plantuml is installed (CI installs
Debian's) the SVG regenerated from the source must be identical to the committed one.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest
from tests.deploy_helpers import REPO

DIAGRAMS = REPO / "docs" / "diagrams"
SOURCES = sorted(DIAGRAMS.glob("*.puml"))
EXPECTED = {"components", "model-families", "reply-stream", "drain", "hot-swap", "layers"}


def _recorded() -> dict[str, str]:
    lines = (DIAGRAMS / "SOURCES.sha256").read_text().splitlines()
    return {name: digest for digest, name in (ln.split() for ln in lines if ln.strip())}


def test_the_diagrams_the_issue_asks_for_exist():
    assert {p.stem for p in SOURCES} == EXPECTED


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_rendered_files_are_current(source):
    for ext in (".svg", ".png"):
        assert source.with_suffix(ext).is_file(), f"{source.with_suffix(ext).name} missing: run `make diagrams`"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert _recorded().get(source.name) == digest, f"{source.name} changed since it was rendered: `make diagrams`"
    assert source.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regenerated_svgs_are_identical(tmp_path):
    if shutil.which("plantuml") is None:
        pytest.skip("plantuml is not installed (tools/ci_install_containers.sh installs Debian's package)")
    # Without graphviz plantuml still exits 0 but draws an error picture instead of the component diagrams.
    assert shutil.which("dot"), "plantuml is installed without graphviz's dot: install Debian's graphviz"
    for src in SOURCES:
        shutil.copy2(src, tmp_path / src.name)
    subprocess.run(["plantuml", "-tsvg", *[p.name for p in SOURCES]], cwd=tmp_path, check=True, timeout=300,
                   capture_output=True)
    for src in SOURCES:
        assert (tmp_path / f"{src.stem}.svg").read_bytes() == src.with_suffix(".svg").read_bytes(), src.name


def test_architecture_shows_every_diagram():
    text = (REPO / "docs" / "architecture.md").read_text()
    for src in SOURCES:
        assert f"diagrams/{src.stem}.svg" in text or f"diagrams/{src.stem}.png" in text, src.stem
