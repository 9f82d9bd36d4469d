"""Decoding speed by precision as the model grows: where int8 starts to pay.

A GPT generator (4 layers, vocabulary 8000, random weights: speed does not depend on training) at
several widths decodes greedily with ``chatforge.decoding`` (the single-stream path, and a batch of 8),
at fp32, bf16 (weights cast, autocast) and int8 (``inference.quantize_int8``). Every reply is forced to
``--new-tokens`` tokens. Precisions alternate within each round; the best of ``--rounds`` is kept.
Records ``chatforge.runtime.cpu_info()`` (CPU model, flags, threads, load).

    python benchmarks/int8_sizes.py [--widths 128 256 512] [--rounds 3] [--precisions fp32 bf16 int8]
        [--out FILE | --publish]
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the _output module beside this script
from _output import add_output_options, output_path  # noqa: E402


def build(d_model: int, n_layers: int, vocab: int):
    from chatforge.models.gpt.config import GPTConfig
    from chatforge.models.gpt.model import GPTLMHeadModel
    from chatforge.tokenizer import SpecialIds

    cfg = GPTConfig(d_model=d_model, n_heads=max(2, d_model // 64), n_layers=n_layers, n_positions=128,
                    dropout=0.0, attn_dropout=0.0)
    return GPTLMHeadModel(cfg, vocab, SpecialIds(), "generation").eval()


def time_decode(model, new_tokens: int, batch: int) -> float:
    """Tokens per second, greedy, ``batch`` prompts of 10 tokens decoded together."""
    from chatforge.decoding import GenerationOptions, autocast_for, generate_batch

    opts = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    prompts = [[5 + (7 * i + j) % 900 for j in range(10)] for i in range(batch)]
    with autocast_for(model):
        generate_batch(model, prompts, GenerationOptions(max_new_tokens=2), bos_id=1, eos_id=2, pad_id=0)  # warm-up
        t0 = time.perf_counter()
        out = generate_batch(model, prompts, opts, bos_id=1, eos_id=2, pad_id=0)
    return sum(len(o) for o in out) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "int8"), default=["fp32", "bf16", "int8"],
                    help="fp32 is always measured (the ratios' base); leave bf16 out on a CPU that emulates it")
    add_output_options(ap, "int8-sizes.json")
    args = ap.parse_args()
    args.out = output_path(args, "int8-sizes.json")

    from chatforge.runtime import configure_threads, cpu_info, set_omp_wait_policy

    set_omp_wait_policy()
    import torch

    from chatforge.inference import quantize_int8

    threads = configure_threads()
    before = cpu_info()
    results = []
    torch.manual_seed(0)
    for d in args.widths:
        fp32 = build(d, args.layers, args.vocab)
        models = {"fp32": fp32}
        if "bf16" in args.precisions:
            models["bf16"] = copy.deepcopy(fp32).to(torch.bfloat16)
        if "int8" in args.precisions:
            models["int8"] = quantize_int8(copy.deepcopy(fp32), "gpt")
        best: dict[str, dict[str, float]] = {p: {} for p in models}
        for r in range(args.rounds):
            for p in (list(models) if r % 2 == 0 else list(reversed(models))):
                for batch in (1, 8):
                    tps = time_decode(models[p], args.new_tokens, batch)
                    key = f"batch{batch}_tokens_per_s"
                    best[p][key] = max(best[p].get(key, 0.0), tps)
        row = {"d_model": d, "n_layers": args.layers, "vocab": args.vocab,
               "parameters": sum(p.numel() for p in fp32.parameters()), "best": best,
               "ratio_to_fp32": {p: {k: v / best["fp32"][k] for k, v in best[p].items()} for p in best}}
        results.append(row)
        print(json.dumps({"d_model": d, **{p: {k: round(v, 1) for k, v in b.items()} for p, b in best.items()}}),
              file=sys.stderr, flush=True)
    out = {"benchmark": "int8_sizes", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "machine_before": before, "machine_after": cpu_info(), "torch": torch.__version__, "torch_threads": threads,
           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
