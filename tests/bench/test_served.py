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
