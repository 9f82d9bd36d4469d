"""benchmarks/grpc_path.py and http_path.py record which CPU they ran on, not only the kernel and the load.

README quotes their figures (``grpc-path-base.json``, ``http-path-tiny.json``) beside a CPU; the result has to
say which one. The measuring itself (a trained bundle, a server) is replaced by fakes here: what is checked is
the record the script writes around it.
"""

from __future__ import annotations

import json
import sys

import pytest
from tests.benchmarks.conftest import ROOT, load


def _fakes(name, mod, monkeypatch):
    monkeypatch.setattr(sys.modules["serving_bench"], "train_bundle", lambda *a, **k: "BUNDLE")
    if name == "http_path":
        three = {"direct": 2.0, "grpc": 3.0, "http": 3.5}
        monkeypatch.setattr(mod, "in_process_abc", lambda *a, **k: {
            "ttft_ms": three, "ttft_overhead_ms": {"grpc": 1.0, "http": 1.5}, "ttft_http_minus_grpc_ms": 0.5,
            "tokens_per_s": three, "http_stages_ms": {"client_to_app": 0.4}})
    else:
        monkeypatch.setattr(mod, "echo_baseline", lambda *a, **k: {"ttft_ms": 0.5, "client_to_handler_ms": 0.3})
        monkeypatch.setattr(mod, "in_process_ab", lambda *a, **k: {
            "ttft_rpc_ms": 3.0, "ttft_direct_ms": 2.0, "ttft_overhead_ms": 1.0, "tokens_per_s_rpc": 9.0,
            "tokens_per_s_direct": 10.0, "stream_rate_ratio": 0.9, "stages_ms": {"client_to_interceptor": 1.0}})


@pytest.mark.parametrize("name", ["grpc_path", "http_path"])
def test_the_result_names_the_cpu(name, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    mod = load(name)
    import serving_bench  # noqa: F401  (main imports it; the fake goes on the module main will get)

    _fakes(name, mod, monkeypatch)
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--workdir", str(tmp_path / "w"), "--size", "tiny", "--reps", "2",
                                      "--out", str(out)])
    mod.main()
    from chatforge.runtime import cpu_info

    here = cpu_info()
    machine = json.loads(out.read_text())["machine"]
    assert machine["cpu"]["model_name"] == here["model_name"] and machine["cpu"]["flags"] == here["flags"]
    assert machine["cpu"]["available_cpus"] == here["available_cpus"]
    assert len(machine["loadavg_start"]) == len(machine["loadavg_end"]) == 3
    assert here["model_name"] in capsys.readouterr().out
