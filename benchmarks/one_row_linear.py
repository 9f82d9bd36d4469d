"""One-row fp32 linear layers (a lone stream's decode step): F.linear and oneDNN against ``x @ W^T`` on a weight stored
transposed, and what the served choice (``PackPolicy.one_row_transposed``) does to a GPT's decode step (issue 16).

A decode step of one stream multiplies one row by every weight matrix: a matrix-vector product, bound by reading
the weights. torch's ``F.linear`` (oneMKL's sgemm) and oneDNN's prepacked op read a weight as a dot product per
output; the product of the row with the weight stored inputs x outputs adds each input times a contiguous row of
outputs instead. Cases, timed interleaved in one process, medians over ``reps`` rounds:

* per layer shape (those of ``configs/gpt_chatbot_kr.yaml``'s GPT, d_model 256, vocabulary 8,000, and of a d_model-768
  block): each kernel warm (the weight just read) and cold (32 MB of other memory touched first, as the other layers
  of a step do); the ratio to the best of F.linear and oneDNN;
* end to end: greedy decode steps of a random-weight GPT of that config's shape, packed for serving under the AVX-512
  policy with and without ``one_row_transposed`` (prefill, then ``steps`` one-token steps), and whether their greedy
  tokens agree.

    python benchmarks/one_row_linear.py [--size tiny] [--out FILE.json | --publish]

Writes JSON (``runs/bench/one-row-linear.json`` unless ``--out``/``--publish``) with ``runtime.cpu_info()`` and a
Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import add_output_options, output_path  # noqa: E402

SIZES = {
    # layer shapes (outputs, inputs); the GPT's d_model, layers, vocabulary; rounds; decode steps
    "full": {"shapes": [(768, 256), (256, 256), (1024, 256), (256, 1024), (8000, 256), (2304, 768), (3072, 768),
                        (768, 3072)], "gpt": (256, 4, 8000), "reps": 41, "steps": 16},
    "tiny": {"shapes": [(512, 128), (128, 512)], "gpt": (128, 1, 1000), "reps": 3, "steps": 2},
}
FLUSH_FLOATS = 8_000_000  # 32 MB


def _time(fns: dict[str, Any], reps: int, flush=None) -> dict[str, float]:
    """Median microseconds per call of each function, interleaved; ``flush`` runs before each call, untimed."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if flush is not None:
                flush()
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e6)
    skip = min(3, reps - 1)  # warm-up rounds
    return {k: statistics.median(v[skip:]) for k, v in times.items()}


def layer_cases(shapes, reps: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from chatforge.modules import linear as lm

    op = lm._onednn_linear()
    reorder = torch.ops.mkldnn._reorder_linear_weight
    buf = torch.randn(FLUSH_FLOATS)
    rows = []
    for out_f, in_f in shapes:
        w, b, x = torch.randn(out_f, in_f) * 0.02, torch.randn(out_f), torch.randn(1, in_f)
        wt = w.t().contiguous()
        fns = {"F.linear": lambda w=w, b=b, x=x: F.linear(x, w, b),
               "transposed": lambda wt=wt, b=b, x=x: torch.addmm(b, x, wt)}
        if op is not None:
            packed = reorder(w, None)
            fns["oneDNN"] = lambda p=packed, b=b, x=x: op(x, p, b, "none", [], "")
        for state, flush in (("warm", None), ("cold", lambda: buf.mul_(1.0))):
            us = _time(fns, reps, flush)
            best_other = min(v for k, v in us.items() if k != "transposed")
            rows.append({"outputs": out_f, "inputs": in_f, "state": state, "us": us,
                         "transposed_vs_best_other": best_other / us["transposed"],
                         "chosen_by_policy": out_f >= in_f})
    return rows


def decode_case(d_model: int, n_layers: int, vocab: int, reps: int, steps: int) -> dict:
    import torch

    from chatforge.models.gpt import GPTConfig, GPTLMHeadModel
    from chatforge.models.gpt.step import GPTStepModel
    from chatforge.modules import linear as lm
    from chatforge.tokenizer import SpecialIds

    if lm._onednn_linear() is None:
        return {"skipped": "this torch build has no oneDNN linear op"}
    policies = {"without": lm.PACK_AVX512._replace(one_row_transposed=False), "with": lm.PACK_AVX512}
    models = {}
    for name, policy in policies.items():
        torch.manual_seed(0)
        cfg = GPTConfig(variant="gpt2", d_model=d_model, n_heads=4, n_layers=n_layers, n_positions=128, dropout=0.0,
                        attn_dropout=0.0)
        special = SpecialIds(pad=0, bos=1, eos=2, unk=3, cls=vocab - 2, sep=vocab - 1)
        model = GPTLMHeadModel(cfg, vocab, special, task="lm").eval()
        lm.pack_linear_layers(model, policy=policy)
        models[name] = GPTStepModel(model)
    prompt = list(range(10, 19))

    def decode(sm) -> list[int]:
        state, logits = sm.prefill([prompt], 1)
        out = [int(logits.argmax())]
        for _ in range(steps):
            logits = sm.step(state, torch.tensor([out[-1]]))
            out.append(int(logits.argmax()))
        return out

    tokens = {k: decode(sm) for k, sm in models.items()}
    per_step = {k: [] for k in models}
    for _ in range(reps):
        for name, sm in models.items():
            state, logits = sm.prefill([prompt], 1)
            tok = torch.tensor([int(logits.argmax())])
            t0 = time.perf_counter()
            for _ in range(steps):
                sm.step(state, tok)
            per_step[name].append((time.perf_counter() - t0) * 1e3 / steps)
    skip = min(3, reps - 1)
    ms = {k: statistics.median(v[skip:]) for k, v in per_step.items()}
    return {"model": {"d_model": d_model, "n_layers": n_layers, "vocab": vocab}, "steps": steps,
            "ms_per_step": ms, "speedup": ms["without"] / ms["with"], "same_greedy_tokens": tokens["with"] == tokens["without"]}


def markdown(result: dict) -> str:
    lines = [f"CPU: {result['cpu'].get('model_name')}, torch threads {result['cpu'].get('torch_threads')}, load "
             f"{result['load_before']} -> {result['load_after']}", "",
             "| layer (outputs x inputs) | state | F.linear us | oneDNN us | transposed us | transposed vs best other "
             "| policy uses it |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["layers"]:
        us = r["us"]
        lines.append(f"| {r['outputs']} x {r['inputs']} | {r['state']} | {us['F.linear']:.1f} | "
                     f"{us.get('oneDNN', float('nan')):.1f} | {us['transposed']:.1f} | "
                     f"{r['transposed_vs_best_other']:.2f}x | {'yes' if r['chosen_by_policy'] else 'no'} |")
    d = result["decode"]
    if "ms_per_step" in d:
        lines += ["", f"GPT decode step (d_model {d['model']['d_model']}, {d['model']['n_layers']} layers, vocabulary "
                      f"{d['model']['vocab']}, one stream): {d['ms_per_step']['without']:.3f} ms without, "
                      f"{d['ms_per_step']['with']:.3f} ms with one-row transposed calls: {d['speedup']:.2f}x; "
                      f"greedy tokens identical: {d['same_greedy_tokens']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (serving uses 1 on a 2-CPU machine)")
    add_output_options(ap, "one-row-linear.json")
    args = ap.parse_args(argv)
    import os

    import torch

    from chatforge.runtime import cpu_info

    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    load_before = os.getloadavg()
    result: dict = {"cpu": cpu_info(), "size": args.size, "load_before": [round(x, 2) for x in load_before]}
    with torch.inference_mode():
        result["layers"] = layer_cases(size["shapes"], size["reps"])
    result["decode"] = decode_case(*size["gpt"], reps=size["reps"], steps=size["steps"])
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    out = output_path(args, "one-row-linear.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
