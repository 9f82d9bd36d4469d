"""schemathesis (a property-based OpenAPI fuzzer no one here wrote) against the served /openapi.json.

A bounded run (``--max-examples``, fixed ``--seed``) over every operation, with every check
schemathesis has: no 5xx, status codes, content types, headers and bodies as documented, and
invalid input rejected. One check is left out, on purpose: ``positive_data_acceptance`` (every
schema-valid request must succeed) cannot hold for a chat API, whose acceptance also depends on
what no static schema states: the served model's input-token limit, a message list whose last
user turn is blank, the server's configured caps. Those requests get a 400 naming the field,
which the document lists. The server is the real one (gRPC + HTTP, fake models).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from tests.serving_fakes import ServerThread, make_engine

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 30


def _schemathesis() -> str:
    exe = Path(sys.executable).parent / "schemathesis"
    found = str(exe) if exe.exists() else shutil.which("schemathesis")
    if found is None:
        pytest.skip("schemathesis is not installed (a dev dependency: pip install -e '.[dev]')")
    return found


def test_openapi_document_holds_under_fuzzing(tmp_path):
    exe = _schemathesis()
    with ServerThread(make_engine(max_input_chars=4000), http_port=0) as st:
        st.wait_serving()
        url = f"http://127.0.0.1:{st.server.http.port}/openapi.json"
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"}
        proc = subprocess.run(
            [exe, "run", url, "--checks", "all", "--exclude-checks", "positive_data_acceptance",
             "--max-examples", str(MAX_EXAMPLES), "--seed", "1",
             "--workers", "1", "--phases", "examples,coverage,fuzzing", "--request-timeout", "10",
             "--report", "junit", "--report-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # The run did test every operation (a schema with no operations would pass trivially).
    [report] = tmp_path.glob("junit*.xml")
    cases = ElementTree.parse(report).getroot().iter("testcase")
    tested = {c.get("name") for c in cases}
    assert tested == {"POST /v1/chat/completions", "POST /v1/classify", "GET /healthz", "GET /readyz",
                      "GET /v1/models", "GET /v1/models/{model}"}, tested
