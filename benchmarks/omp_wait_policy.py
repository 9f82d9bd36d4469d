"""CPU time per training step, and latency of one inference call at batch 1, with torch's default OpenMP wait
policy, with OMP_WAIT_POLICY=PASSIVE and with PASSIVE after a short spin (GOMP_SPINCOUNT=1000, what the ``chatforge`` CLI sets;
``chatforge.runtime.set_omp_wait_policy``), quiet and contended.

Each case is a fresh process (the OpenMP runtime reads the policy once, when torch loads it) that
trains a model of configs/chatbot_kr_transformer.yaml's shape (d_model 128, 4 heads, 2+2 layers,
d_ff 512, vocabulary 4000, batch 64 x 40 tokens) for a few steps and reports, per step, the CPU time
of the whole process (all threads: ``time.process_time``) and the wall time; and (``CHILD_INFER``) that classifies
one text at a time with a BERT-sized encoder, per call. ``--busy K`` adds K
busy-looping processes for the contended cases (a shared machine's load). The process's threads are
the CPUs available to it (``chatforge.runtime.available_cpus``).

    python benchmarks/omp_wait_policy.py [--steps 10] [--busy 4] [--out FILE | --publish]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the _output module beside this script
from _output import add_output_options, output_path  # noqa: E402

CHILD = r"""
import json, sys, time
import torch
from torch import nn
from chatforge.runtime import configure_threads
threads = configure_threads()
torch.manual_seed(0)
V, D, T, B = 4000, 128, 40, 64
emb = nn.Embedding(V, D)
core = nn.Transformer(D, 4, 2, 2, 512, dropout=0.1, batch_first=True)
head = nn.Linear(D, V)
params = [*emb.parameters(), *core.parameters(), *head.parameters()]
opt = torch.optim.AdamW(params, lr=1e-3)
src = torch.randint(0, V, (B, T)); tgt = torch.randint(0, V, (B, T))
def step():
    opt.zero_grad()
    y = core(emb(src), emb(tgt), tgt_mask=core.generate_square_subsequent_mask(T))
    loss = nn.functional.cross_entropy(head(y).view(-1, V), tgt.view(-1))
    loss.backward(); opt.step()
step()
cpu, wall = [], []
for _ in range(int(sys.argv[1])):
    c0, w0 = time.process_time(), time.perf_counter()
    step()
    cpu.append(time.process_time() - c0); wall.append(time.perf_counter() - w0)
print(json.dumps({"threads": threads, "cpu_s": cpu, "wall_s": wall}))
"""


# Inference at batch 1: a BERT-sized encoder (4 layers, d_model 256, 4 heads, d_ff 1024) classifying one text of 32
# tokens at a time, as a served Classify call does. Its ops are small, so each parallel region is short and the next
# one follows within microseconds: whether the workers still spin then, or must be woken, decides the latency.
CHILD_INFER = r"""
import json, sys, time
import torch
from torch import nn
from chatforge.runtime import configure_threads
threads = configure_threads()
torch.manual_seed(0)
enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True), 4).eval()
head = nn.Linear(256, 151)
x = torch.randn(1, 32, 256)
def call():
    with torch.inference_mode():
        head(enc(x)[:, 0])
for _ in range(20):
    call()
cpu, wall = [], []
for _ in range(int(sys.argv[1])):
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(20):
        call()
    cpu.append((time.process_time() - c0) / 20); wall.append((time.perf_counter() - w0) / 20)
print(json.dumps({"threads": threads, "cpu_s": cpu, "wall_s": wall}))
"""

# (name, environment): torch's default (libgomp spins 300,000 times after a region), PASSIVE (no spin: what the CLI
# set until now), and PASSIVE after a short spin (what it sets now: chatforge.runtime.OMP_SPIN_COUNT, 1,000; 3,000
# and 10,000 were no better quiet and worse contended).
POLICIES = (("default", {}), ("PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),
            ("PASSIVE, GOMP_SPINCOUNT=1000", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}))


def run_case(policy: str | None, steps: int, workload: str = "training", env_extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if env_extra is not None:
        env.update(env_extra)
    elif policy:
        env["OMP_WAIT_POLICY"] = policy
    child = CHILD if workload == "training" else CHILD_INFER
    r = subprocess.run([sys.executable, "-c", child, str(steps)], env=env, capture_output=True, text=True,
                       check=True, timeout=1800)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return {"policy": policy or "default", "workload": workload, "threads": d["threads"],
            "cpu_s_per_step_median": statistics.median(d["cpu_s"]),
            "wall_s_per_step_median": statistics.median(d["wall_s"]), "cpu_s": d["cpu_s"], "wall_s": d["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--busy", type=int, default=4, help="busy-looping processes in the contended cases")
    add_output_options(ap, "omp-wait-policy.json")
    args = ap.parse_args()
    args.out = output_path(args, "omp-wait-policy.json")
    from chatforge.runtime import cpu_info

    cases = []
    for contended in (False, True):
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy if contended else 0)]
        try:
            for workload in ("training", "inference"):
                for name, extra in POLICIES:
                    info = cpu_info()
                    case = {"contended_by": len(busy), **run_case(name, args.steps, workload, extra),
                            "load_average": info["load_average"]}
                    cases.append(case)
                    print({k: v for k, v in case.items() if not isinstance(v, list)}, file=sys.stderr, flush=True)
        finally:
            for p in busy:
                p.kill()
                p.wait()
    out = {"benchmark": "omp_wait_policy", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": cpu_info(), "settings": {"steps": args.steps, "busy": args.busy}, "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
