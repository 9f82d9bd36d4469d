"""chatforge loadtest's report names the machine the load came from, with its load before and after the run.

README's load test (docs/loadtest) ran client and server on the same 2 cores; report.json and report.png have to
say which CPU and how loaded it was, or a rerun elsewhere cannot be compared with them.
"""

from __future__ import annotations

import json
import sys

from tests.client.test_loadtest import _cfg, server  # noqa: F401  (the fixture)

from chatforge.client.loadtest import run_load_test, write_report
from chatforge.runtime import cpu_info


def test_report_json_and_png_name_the_client_cpu_and_load(server, tmp_path, monkeypatch):  # noqa: F811
    from matplotlib.figure import Figure

    titles = []
    real = Figure.savefig

    def keep(self, *a, **k):
        titles.append(self._suptitle.get_text() if self._suptitle else "")
        return real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    torch_loaded = "torch" in sys.modules
    report = run_load_test(_cfg(server.target, rpc="health", requests=4))
    assert ("torch" in sys.modules) == torch_loaded  # naming the CPU does not load torch in a load generator
    paths = write_report(report, tmp_path)
    client = json.loads(paths["json"].read_text())["client"]
    here = cpu_info()
    assert client["model_name"] == here["model_name"] and client["flags"] == here["flags"]
    assert client["available_cpus"] == here["available_cpus"]
    assert len(client["load_before"]) == len(client["load_after"]) == 3
    assert len(titles) == 1 and here["model_name"] in titles[0] and str(client["load_before"]) in titles[0]
