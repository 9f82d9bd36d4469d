"""Attention while training on CPU: SDPA's kernel against the same product written as two matmuls around a softmax
(``modules.attention.materialized_attention``, what ``CHATFORGE_ATTENTION=auto`` uses for small products), with
Hugging Face transformers' two attention implementations beside chatforge in a training step (issue 16).

In one process, interleaved repetitions (the order rotates), warm-up excluded, ``torch.set_num_threads(--threads)``:

* **kernels**: one attention product's forward and backward (q, k and v gradients), 4 heads of 64, 1,024 query
  positions per call in all (batch x length), fp32 and bf16 (where the CPU computes bf16 natively), causal or with
  a key-padding mask, at lengths 32-1024: SDPA (``F.scaled_dot_product_attention``) against the materialized form,
  milliseconds per call and the ratio. Lengths past ``materialize_limit`` (per dtype) are measured to show why
  ``auto`` leaves them to SDPA;
* **step**: ``chatforge bench``'s GPT-2 training step (4 layers, d_model 256, vocabulary 8,000, batch 8 x 128,
  forward + backward + AdamW, 3 steps per repetition), in fp32 and bf16 autocast, of chatforge with
  ``CHATFORGE_ATTENTION=auto`` and ``=sdpa`` and of HF ``GPT2LMHeadModel`` on the same weights (``chatforge to-hf``)
  with ``attn_implementation="sdpa"`` (its default) and ``"eager"``: tokens/s and ratios;
* **agreement**: the losses of 5 training steps from the same weights with either attention (fp32).

    nice -n 10 python benchmarks/attention_kernels.py --out benchmarks/results/attention-kernels [--size tiny]

Writes ``attention-kernels.json``, ``.md`` and ``.png`` under ``--out``, with the CPU model (lscpu), threads and the
load before and after (a loaded run says so: then only the ratios mean anything).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


class Size(NamedTuple):  # not a dataclass: the tests load this file without registering it as a module
    lengths: tuple[int, ...]
    tokens: int  # query positions per kernel call (batch x length)
    heads: int
    head_dim: int
    gpt: str  # "full" or "smoke": chatforge.bench.cases' sizes of the training step
    calls: int
    reps: int


SIZES = {
    "full": Size(lengths=(32, 64, 128, 256, 512, 1024), tokens=1024, heads=4, head_dim=64, gpt="full", calls=5, reps=7),
    "tiny": Size(lengths=(8, 16), tokens=32, heads=2, head_dim=8, gpt="smoke", calls=1, reps=1),
}
STEP_ENGINES = ("chatforge-auto", "chatforge-sdpa", "hf-sdpa", "hf-eager")


@contextlib.contextmanager
def attention_env(value: str):
    from chatforge.modules.attention import ATTENTION_ENV

    old = os.environ.get(ATTENTION_ENV)
    os.environ[ATTENTION_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ATTENTION_ENV, None)
        else:
            os.environ[ATTENTION_ENV] = old


def _interleaved(fns: dict[str, Any], reps: int) -> dict[str, list[float]]:
    from chatforge.bench.timing import interleaved

    return interleaved(fns, reps)


def _precisions() -> list[str]:
    from chatforge.runtime import native_bf16

    return ["fp32", "bf16"] if native_bf16() else ["fp32"]


def kernel_rows(size: Size) -> list[dict[str, Any]]:
    from chatforge.modules.attention import materialize_limit, materialized_attention, padding_mask

    rows = []
    for precision in _precisions():
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for kind in ("causal", "padding"):
            for t in size.lengths:
                b = max(1, size.tokens // t)
                g = torch.Generator().manual_seed(t)
                q, k, v = (torch.randn(b, size.heads, t, size.head_dim, generator=g).to(dtype).requires_grad_()
                           for _ in range(3))
                grad = torch.randn(b, size.heads, t, size.head_dim, generator=g).to(dtype)
                lengths = torch.tensor([t - (i % 4) * (t // 8) for i in range(b)])
                mask = padding_mask((torch.arange(t)[None, :] < lengths[:, None]).long(), 0)  # (B, 1, 1, T)

                def call(materialized: bool, q=q, k=k, v=v, grad=grad, mask=mask, kind=kind):
                    def run():
                        for _ in range(size.calls):
                            if kind == "causal":
                                y = (materialized_attention(q, k, v, is_causal=True) if materialized
                                     else F.scaled_dot_product_attention(q, k, v, is_causal=True))
                            else:
                                y = (materialized_attention(q, k, v, mask) if materialized
                                     else F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
                            torch.autograd.grad(y, (q, k, v), grad)
                    return run

                times = _interleaved({"sdpa": call(False), "materialized": call(True)}, size.reps)
                med = {name: statistics.median(ts) / size.calls * 1e3 for name, ts in times.items()}
                rows.append({"precision": precision, "mask": kind, "length": t, "batch": b,
                             "sdpa_ms": round(med["sdpa"], 3), "materialized_ms": round(med["materialized"], 3),
                             "ratio": round(med["sdpa"] / med["materialized"], 3),
                             "auto_uses": "materialized" if t * t <= materialize_limit(dtype) else "sdpa"})
    return rows


def _gpt(work: Path, gpt: str):
    from transformers import AutoModelForCausalLM

    from chatforge.bench.cases import FULL, SMOKE, Assets, _random_ids
    from chatforge.bundle import load_bundle

    s = FULL if gpt == "full" else SMOKE
    w = Assets(work, s).gpt()
    x = _random_ids(s.train_batch, s.train_seq_len, s.vocab, seed=0)
    return (s, x, lambda: load_bundle(w.bundle).model,
            lambda impl: AutoModelForCausalLM.from_pretrained(str(w.hf), attn_implementation=impl))


def _steps(model, is_hf: bool, x: torch.Tensor, steps: int, precision: str, kernel: str | None,
           losses: list[float] | None = None):
    """``chatforge bench``'s training step (``bench.gpt_hf.train_steps_fn``), run with ``CHATFORGE_ATTENTION=kernel``."""
    from chatforge.bench.gpt_hf import train_steps_fn

    fn = train_steps_fn(model, is_hf, x, steps, precision, losses)
    if not kernel:
        return fn

    def run():
        with attention_env(kernel):
            fn()
    return run


def step_rows(work: Path, size: Size) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    s, x, chatforge_model, hf_model = _gpt(work, size.gpt)
    tokens = s.train_batch * s.train_seq_len * s.train_steps
    rows = []
    for precision in _precisions():
        fns = {"chatforge-auto": _steps(chatforge_model(), False, x, s.train_steps, precision, "auto"),
               "chatforge-sdpa": _steps(chatforge_model(), False, x, s.train_steps, precision, "sdpa"),
               "hf-sdpa": _steps(hf_model("sdpa"), True, x, s.train_steps, precision, None),
               "hf-eager": _steps(hf_model("eager"), True, x, s.train_steps, precision, None)}
        times = _interleaved(fns, size.reps)
        got = [{"precision": precision, "engine": k, "tokens_per_s": round(tokens / statistics.median(v), 1),
                "best_tokens_per_s": round(tokens / min(v), 1)} for k, v in times.items()]
        by = {r["engine"]: r["tokens_per_s"] for r in got}
        for r in got:
            r["vs_hf_sdpa"] = round(r["tokens_per_s"] / by["hf-sdpa"], 3)
            r["vs_hf_eager"] = round(r["tokens_per_s"] / by["hf-eager"], 3)
        rows += got
    a, b = [], []
    _steps(chatforge_model(), False, x, 5, "fp32", "sdpa", a)()
    _steps(chatforge_model(), False, x, 5, "fp32", "auto", b)()
    agreement = {"losses_sdpa": [round(v, 6) for v in a], "losses_materialized": [round(v, 6) for v in b],
                 "max_abs_loss_diff": max(abs(u - v) for u, v in zip(a, b, strict=True))}
    config = {"model": f"GPT-2, {s.gpt_layers} layers, d_model {s.gpt_d_model}, vocab {s.vocab}",
              "batch": s.train_batch, "seq_len": s.train_seq_len, "steps_per_repeat": s.train_steps}
    return rows, {**config, "agreement": agreement}


def run(out: Path, size_name: str = "full", threads: int | None = None, reps: int | None = None) -> dict[str, Any]:
    from chatforge.bench import machine

    size = SIZES[size_name]
    if reps:
        size = size._replace(reps=reps)
    threads = threads or machine.cpus_available()
    torch.set_num_threads(threads)
    load_before = machine.load_average()
    kernels = kernel_rows(size)
    with tempfile.TemporaryDirectory(prefix="chatforge-attention-") as tmp:
        steps, step_config = step_rows(Path(tmp), size)
    load_after = machine.load_average()
    result = {
        "benchmark": "attention_kernels",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "size": size_name,
        "machine": {"lscpu_model": machine.lscpu_model(), "cpu": machine.cpu_info(), "threads": threads,
                    "load_before": load_before, "load_after": load_after,
                    "loaded": machine.is_loaded([load_before, load_after], threads)},
        "config": {"reps": size.reps, "calls_per_rep": size.calls, "heads": size.heads, "head_dim": size.head_dim,
                   "query_positions_per_call": size.tokens, "step": step_config},
        "kernels": kernels,
        "steps": steps,
    }
    write(result, out)
    return result


def markdown(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["config"]
    lines = [f"# Attention while training: SDPA vs materialized ({r['date']})", "",
             f"CPU: {m['lscpu_model']}; threads {m['threads']}; load before {m['load_before']}, after "
             f"{m['load_after']}" + (" — **loaded: figures are ratios only**" if m["loaded"] else ""), "",
             f"One attention product, forward + backward, {c['heads']} heads of {c['head_dim']}, "
             f"{c['query_positions_per_call']} query positions per call (batch x length), median of {c['reps']} "
             "interleaved repetitions:", "",
             "| precision | mask | length | batch | SDPA (ms) | materialized (ms) | SDPA / materialized time | "
             "`auto` uses |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for x in r["kernels"]:
        lines.append(f"| {x['precision']} | {x['mask']} | {x['length']} | {x['batch']} | {x['sdpa_ms']} | "
                     f"{x['materialized_ms']} | {x['ratio']:.2f}x | {x['auto_uses']} |")
    s = c["step"]
    lines += ["", f"Training step: {s['model']}, batch {s['batch']} x {s['seq_len']}, {s['steps_per_repeat']} steps "
              "per repetition (median):", "",
              "| precision | engine | tokens/s (median) | tokens/s (best) | vs HF (sdpa, its default) | vs HF eager |",
              "|---|---|---:|---:|---:|---:|"]
    for x in r["steps"]:
        lines.append(f"| {x['precision']} | {x['engine']} | {x['tokens_per_s']} | {x['best_tokens_per_s']} | "
                     f"{x['vs_hf_sdpa']:.2f}x | {x['vs_hf_eager']:.2f}x |")
    ag = s["agreement"]
    lines += ["", f"Losses of 5 fp32 steps from the same weights, SDPA: {ag['losses_sdpa']}; materialized: "
              f"{ag['losses_materialized']} (largest difference {ag['max_abs_loss_diff']:.2g})", ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (precision, kind), style in zip(sorted({(x["precision"], x["mask"]) for x in r["kernels"]}),
                                        ("o-", "s--", "^-", "v--"), strict=False):
        pts = [x for x in r["kernels"] if x["precision"] == precision and x["mask"] == kind]
        ax1.plot([x["length"] for x in pts], [x["ratio"] for x in pts], style, label=f"{precision}, {kind}")
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("sequence length")
    ax1.set_ylabel("SDPA time / materialized time (below 1: SDPA faster)")
    ax1.set_title("one attention product, forward + backward")
    ax1.legend(fontsize=8)
    # "chatforge-auto" over "chatforge-sdpa" on one line ran into each other: the engine's parts on lines of their own
    labels = [f"{x['engine'].replace('-', chr(10), 1)}\n{x['precision']}" for x in r["steps"]]
    ax2.bar(labels, [x["tokens_per_s"] for x in r["steps"]],
            color=["tab:blue", "tab:cyan", "tab:gray", "silver"] * (len(labels) // 4 or 1))
    ax2.set_ylabel("training tokens/s (median)")
    ax2.set_title("GPT-2 training step")
    ax2.tick_params(axis="x", labelsize=7)
    m = r["machine"]
    fig.suptitle(f"{m['lscpu_model']}, {m['threads']} threads; load before {m['load_before']}, after "
                 f"{m['load_after']}" + (" — loaded: figures are ratios only" if m["loaded"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict[str, Any], out: Path) -> None:
    from chatforge.fileio import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "attention-kernels.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "attention-kernels.md", markdown(result))
    plot(result, out / "attention-kernels.png")


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
