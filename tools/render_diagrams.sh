#!/usr/bin/env bash
# Render docs/diagrams/*.puml to SVG and PNG with Debian's plantuml (offline; `make diagrams`), and
# record each source's sha256 in docs/diagrams/SOURCES.sha256, so tests/docs/test_diagrams.py can tell a
# render that is current from one whose source changed since (git does not keep mtimes).
set -euo pipefail
cd "$(dirname "$0")/../docs/diagrams"
command -v plantuml >/dev/null || { echo "render_diagrams: plantuml is not installed (apt-get install plantuml)" >&2; exit 1; }
plantuml -tsvg ./*.puml
plantuml -tpng ./*.puml
sha256sum ./*.puml | sed 's| \./| |' > SOURCES.sha256
echo "rendered $(ls ./*.puml | wc -l) diagrams to SVG and PNG" >&2
