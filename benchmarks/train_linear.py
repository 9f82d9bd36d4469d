"""fp32 training on oneDNN's matmul against torch's own (oneMKL's sgemm), the choice chatforge's Trainer makes
(``training.trainer.fp32_training_linear``: ``CHATFORGE_FP32_LINEAR``, oneDNN on AMD CPUs by default), with
Hugging Face transformers beside it (issue 16).

In one process, interleaved repetitions (the order rotates), warm-up excluded, ``torch.set_num_threads(--threads)``:

* **layers**: one linear layer's forward and backward (input, weight and bias gradients) at a training step's sizes
  (rows = batch x sequence length; a GPT-2 block's layers at d_model 256, its 8,000-word output head, and a BERT
  block's at 768), torch's ``F.linear`` against ``modules.linear.OneDNNTrainingLinear``: milliseconds per call,
  GFLOP/s, the ratio;
* **step**: ``chatforge bench``'s GPT-2 training step (4 layers, d_model 256, vocabulary 8,000, batch 8 x 128,
  forward + backward + AdamW, 3 steps per repetition) of chatforge with torch's matmul, chatforge with oneDNN's, and
  HF ``GPT2LMHeadModel`` on the same weights (``chatforge to-hf``): tokens/s and ratios;
* **agreement**: the losses of 5 training steps from the same weights on torch's and on oneDNN's matmul (same
  arithmetic in fp32, different summation order: they differ by float rounding).

Also the fp32 matmul peak of each kernel, (n, n) @ (n, n).

    nice -n 10 python benchmarks/train_linear.py --out benchmarks/results/train-linear [--size tiny]

Writes ``train-linear.json``, ``train-linear.md`` and ``train-linear.png`` under ``--out``, with the CPU model
(lscpu), threads and the load before and after (a loaded run says so: then only the ratios mean anything).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch


class Size(NamedTuple):  # not a dataclass: the tests load this file without registering it as a module
    layers: tuple[tuple[str, int, int, int], ...]  # (name, rows, in, out)
    gpt: str  # "full" or "smoke": chatforge.bench.cases' sizes of the training step
    calls: int  # layer calls per repetition
    reps: int
    matmul_n: int


SIZES = {
    "full": Size(layers=(("GPT-2 d256 attention in (256 -> 768)", 1024, 256, 768),
                         ("GPT-2 d256 attention out (256 -> 256)", 1024, 256, 256),
                         ("GPT-2 d256 feed-forward in (256 -> 1024)", 1024, 256, 1024),
                         ("GPT-2 d256 feed-forward out (1024 -> 256)", 1024, 1024, 256),
                         ("GPT-2 d256 output head (256 -> 8000)", 1024, 256, 8000),
                         ("BERT-base feed-forward in (768 -> 3072)", 4096, 768, 3072),
                         ("BERT-base feed-forward out (3072 -> 768)", 4096, 3072, 768)),
                 gpt="full", calls=5, reps=7, matmul_n=2048),
    "tiny": Size(layers=(("tiny (64 -> 256)", 64, 64, 256),), gpt="smoke", calls=1, reps=1, matmul_n=128),
}
ENGINES = ("chatforge-torch-matmul", "chatforge-onednn", "hf")


def _mode():
    from chatforge.modules.linear import onednn_training_linear

    mode = onednn_training_linear(min_macs=0)
    if mode is None:
        raise SystemExit("this torch build has no oneDNN linear op: nothing to compare")
    return mode


def _interleaved(fns: dict[str, Any], reps: int) -> dict[str, list[float]]:
    from chatforge.bench.timing import interleaved

    return interleaved(fns, reps)


def layer_rows(size: Size) -> list[dict[str, Any]]:
    mode = _mode()
    rows = []
    for name, m, k, n in size.layers:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=g, requires_grad=True)
        layer = torch.nn.Linear(k, n)
        grad = torch.randn(m, n, generator=g)

        def call(routed: bool, x=x, layer=layer, grad=grad):
            def run():
                for _ in range(size.calls):
                    with mode if routed else contextlib.nullcontext():
                        y = layer(x)
                    y.backward(grad)
            return run

        times = _interleaved({"torch": call(False), "onednn": call(True)}, size.reps)
        flops = 6 * m * k * n * size.calls  # forward, input gradient, weight gradient
        med = {k2: statistics.median(v) for k2, v in times.items()}
        rows.append({"layer": name, "rows": m, "in": k, "out": n,
                     "torch_ms": round(med["torch"] / size.calls * 1e3, 3),
                     "onednn_ms": round(med["onednn"] / size.calls * 1e3, 3),
                     "torch_gflops": round(flops / med["torch"] / 1e9, 1),
                     "onednn_gflops": round(flops / med["onednn"] / 1e9, 1),
                     "ratio": round(med["torch"] / med["onednn"], 3)})
    return rows


def _gpt(work: Path, gpt: str):
    from transformers import AutoModelForCausalLM

    from chatforge.bench.cases import FULL, SMOKE, Assets, _random_ids
    from chatforge.bundle import load_bundle

    s = FULL if gpt == "full" else SMOKE
    w = Assets(work, s).gpt()
    x = _random_ids(s.train_batch, s.train_seq_len, s.vocab, seed=0)
    return s, x, (lambda: load_bundle(w.bundle).model), (lambda: AutoModelForCausalLM.from_pretrained(str(w.hf)))


def _steps(model, is_hf: bool, x: torch.Tensor, steps: int, mode, losses: list[float] | None = None):
    from chatforge.bench.gpt_hf import shifted_labels

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = x if is_hf else shifted_labels(x)

    def run():
        for _ in range(steps):
            with mode if mode is not None else contextlib.nullcontext():
                loss = model(x, labels=labels).loss
            if losses is not None:
                losses.append(loss.item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def step_rows(work: Path, size: Size) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    s, x, chatforge_model, hf_model = _gpt(work, size.gpt)
    mode = _mode()
    fns = {"chatforge-torch-matmul": _steps(chatforge_model(), False, x, s.train_steps, None),
           "chatforge-onednn": _steps(chatforge_model(), False, x, s.train_steps, mode),
           "hf": _steps(hf_model(), True, x, s.train_steps, None)}
    times = _interleaved(fns, size.reps)
    tokens = s.train_batch * s.train_seq_len * s.train_steps
    rows = [{"engine": k, "tokens_per_s": round(tokens / statistics.median(v), 1),
             "best_tokens_per_s": round(tokens / min(v), 1)} for k, v in times.items()]
    by = {r["engine"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        r["vs_hf"] = round(r["tokens_per_s"] / by["hf"], 3)
        r["vs_torch_matmul"] = round(r["tokens_per_s"] / by["chatforge-torch-matmul"], 3)
    # Agreement: 5 steps from the same weights on either matmul.
    a, b = [], []
    _steps(chatforge_model(), False, x, 5, None, a)()
    _steps(chatforge_model(), False, x, 5, mode, b)()
    agreement = {"losses_torch_matmul": [round(v, 6) for v in a], "losses_onednn": [round(v, 6) for v in b],
                 "max_abs_loss_diff": max(abs(u - v) for u, v in zip(a, b, strict=True))}
    config = {"model": f"GPT-2, {s.gpt_layers} layers, d_model {s.gpt_d_model}, vocab {s.vocab}",
              "batch": s.train_batch, "seq_len": s.train_seq_len, "steps_per_repeat": s.train_steps}
    return rows, {**config, "agreement": agreement}


def matmul_peaks(n: int) -> dict[str, float]:
    from chatforge.modules.linear import _onednn_linear

    op = _onednn_linear()
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = {}
    for name, fn in (("torch", lambda: torch.matmul(a, b)), ("onednn", lambda: op(a, b, None, "none", [], ""))):
        fn()
        best = min(_timed(fn) for _ in range(5))
        out[name] = round(2 * n**3 / best / 1e9, 1)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(out: Path, size_name: str = "full", threads: int | None = None, reps: int | None = None) -> dict[str, Any]:
    from chatforge.bench import machine

    size = SIZES[size_name]
    if reps:
        size = size._replace(reps=reps)
    threads = threads or machine.cpus_available()
    torch.set_num_threads(threads)
    load_before = machine.load_average()
    with tempfile.TemporaryDirectory(prefix="chatforge-train-linear-") as tmp:
        layers = layer_rows(size)
        steps, step_config = step_rows(Path(tmp), size)
    peaks = matmul_peaks(size.matmul_n)
    load_after = machine.load_average()
    result = {
        "benchmark": "train_linear",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "size": size_name,
        "machine": {"lscpu_model": machine.lscpu_model(), "cpu": machine.cpu_info(), "threads": threads,
                    "load_before": load_before, "load_after": load_after,
                    "loaded": machine.is_loaded([load_before, load_after], threads)},
        "config": {"reps": size.reps, "calls_per_rep": size.calls, "matmul_n": size.matmul_n, "step": step_config},
        "matmul_peak_gflops": peaks,
        "layers": layers,
        "steps": steps,
    }
    write(result, out)
    return result


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"# fp32 training: oneDNN's matmul vs torch's ({r['date']})", "",
             f"CPU: {m['lscpu_model']}; threads {m['threads']}; load before {m['load_before']}, after "
             f"{m['load_after']}" + (" — **loaded: figures are ratios only**" if m["loaded"] else ""), "",
             f"fp32 matmul peak, ({r['config']['matmul_n']})^2: torch {r['matmul_peak_gflops']['torch']} GFLOP/s, "
             f"oneDNN {r['matmul_peak_gflops']['onednn']} GFLOP/s", "",
             "| layer (forward + backward) | rows | torch (ms) | oneDNN (ms) | torch GFLOP/s | oneDNN GFLOP/s | "
             "oneDNN / torch speed |", "|---|---:|---:|---:|---:|---:|---:|"]
    for x in r["layers"]:
        lines.append(f"| {x['layer']} | {x['rows']} | {x['torch_ms']} | {x['onednn_ms']} | {x['torch_gflops']} | "
                     f"{x['onednn_gflops']} | {x['ratio']:.2f}x |")
    c = r["config"]["step"]
    lines += ["", f"Training step: {c['model']}, batch {c['batch']} x {c['seq_len']}, {c['steps_per_repeat']} "
              f"steps per repetition, {r['config']['reps']} interleaved repetitions (median)", "",
              "| engine | tokens/s (median) | tokens/s (best) | vs HF | vs chatforge on torch's matmul |",
              "|---|---:|---:|---:|---:|"]
    for x in r["steps"]:
        lines.append(f"| {x['engine']} | {x['tokens_per_s']} | {x['best_tokens_per_s']} | {x['vs_hf']:.2f}x | "
                     f"{x['vs_torch_matmul']:.2f}x |")
    ag = c["agreement"]
    lines += ["", f"Losses of 5 steps from the same weights, torch's matmul: {ag['losses_torch_matmul']}; oneDNN's: "
              f"{ag['losses_onednn']} (largest difference {ag['max_abs_loss_diff']:.2g})", ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [x["layer"].split(" (")[0] for x in r["layers"]]
    ys = range(len(names))
    ax1.barh([y + 0.2 for y in ys], [x["torch_gflops"] for x in r["layers"]], height=0.4, label="torch (oneMKL)")
    ax1.barh([y - 0.2 for y in ys], [x["onednn_gflops"] for x in r["layers"]], height=0.4, label="oneDNN")
    ax1.set_yticks(list(ys), names, fontsize=7)
    ax1.set_xlabel("GFLOP/s, forward + backward")
    ax1.legend(fontsize=8)
    ax1.set_title("one linear layer")
    ax2.bar([x["engine"] for x in r["steps"]], [x["tokens_per_s"] for x in r["steps"]],
            color=["tab:blue", "tab:orange", "tab:gray"])
    ax2.set_ylabel("training tokens/s (median)")
    ax2.set_title("GPT-2 training step, fp32")
    ax2.tick_params(axis="x", labelsize=8)
    m = r["machine"]
    fig.suptitle(f"{m['lscpu_model']}, {m['threads']} threads; load before {m['load_before']}, after "
                 f"{m['load_after']}" + (" — loaded: figures are ratios only" if m["loaded"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict[str, Any], out: Path) -> None:
    from chatforge.fileio import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train-linear.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "train-linear.md", markdown(result))
    plot(result, out / "train-linear.png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs available)")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    r = run(args.out, args.size, args.threads, args.reps)
    print(markdown(r))


if __name__ == "__main__":
    main()
