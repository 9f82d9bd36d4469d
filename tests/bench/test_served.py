"""chatforge.bench.served: interleaved repetitions (warm-up dropped, order rotated) and stopping servers."""

from __future__ import annotations

import subprocess
import sys

from chatforge.bench import served


class Engine:
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    async def run(self, case, inputs, arg):
        self.calls.append((self.name, case))
        return {"engine": self.name, "case": case, "inputs": inputs, "arg": arg, "n": len(self.calls)}


def test_interleaved_runs_drop_the_warm_up_and_rotate_the_engine_order():
    calls: list = []
    engines = {n: Engine(n, calls) for n in ("a", "b", "c")}
    runs = served.interleaved_runs(engines, ["one", "two"], {"one": [1], "two": [2]}, 7, reps=3)
    assert len(calls) == 4 * 3 * 2  # warm-up + 3 repetitions, 3 engines, 2 cases
    firsts = [calls[i][0] for i in range(0, len(calls), 6)]
    assert firsts == ["a", "a", "b", "c"]  # warm-up in order, then each repetition starts one place later
    for e in engines:
        for case, inp in (("one", [1]), ("two", [2])):
            kept = runs[e][case]
            assert len(kept) == 3 and all(r["engine"] == e and r["inputs"] == inp and r["arg"] == 7 for r in kept)
            assert min(r["n"] for r in kept) > 6  # none from the warm-up round (its 6 calls came first)


def test_stop_servers_ends_every_process():
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    served.stop_servers(procs, timeout=10)
    assert all(p.poll() is not None for p in procs)


def test_start_server_ignores_a_port_file_left_by_an_earlier_server(tmp_path, monkeypatch):
    """A work folder reused across runs holds the last server's port file: reading it at once connected the
    benchmark to a dead port and hung it (found while profiling the served engines)."""
    (tmp_path / "eng.port").write_text("1111")

    class FakeServer:  # writes its port file a moment after starting, as `chatforge serve` does once SERVING
        def __init__(self, argv, **kw):
            self.port_file = tmp_path / "eng.port"
            self.polls = 0

        def poll(self):
            self.polls += 1
            if self.polls == 2:
                self.port_file.write_text("2222")
            return None

    monkeypatch.setattr(served.subprocess, "Popen", FakeServer)
    proc, target = served.start_server(tmp_path / "bundle", "chat", "torch", "fp32", tmp_path, "eng")
    assert target == "127.0.0.1:2222"
