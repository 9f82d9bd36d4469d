"""chatforge GPT-2 vs Hugging Face ``GPT2LMHeadModel``: same config, same weights, one run, on CPU.

Measures, in fp32 and under bf16 autocast:

* training tokens/s: forward + backward + AdamW step on (batch, seq_len) random tokens;
* greedy generation tokens/s and time-to-first-token (TTFT) at batch 1 and batch 8:
  chatforge ``generate_batch`` vs HF ``generate(do_sample=False)``, both forced to produce exactly
  ``--new-tokens`` tokens (min = max), so the work is identical; TTFT is a 1-token generation.
  chatforge is called as a user calls it (``generate_batch`` inside inference mode and autocast);
  HF gets the faster of calling ``generate`` inside or outside inference mode.

Each measurement is repeated ``--reps`` times and the median kept. Prints a table with the
chatforge/HF ratios and writes JSON under benchmarks/results/. The machine is shared, so run it
when it is quiet and read the ratios (measured back to back) rather than the absolute numbers.

    python benchmarks/gpt_vs_hf.py [--layers 4 --d-model 256 --reps 3 --threads 2]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from chatforge.decoding import GenerationOptions, generate_batch
from chatforge.interop.hf_gpt import state_dict_from_hf
from chatforge.models.gpt import GPTConfig, GPTLMHeadModel
from chatforge.registry import SpecialIds

ROOT = Path(__file__).resolve().parents[1]


def build_pair(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.positions, n_embd=args.d_model, n_layer=args.layers,
                        n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    hf = GPT2LMHeadModel(hf_cfg)
    cfg = GPTConfig(variant="gpt2", d_model=args.d_model, n_heads=args.heads, n_layers=args.layers,
                    n_positions=args.positions, dropout=0.0, attn_dropout=0.0)
    mine = GPTLMHeadModel(cfg, args.vocab, SpecialIds(pad=0, bos=0, eos=0, unk=0), "lm")
    mine.load_state_dict(state_dict_from_hf(hf.state_dict(), "gpt2", args.layers))
    return mine, hf


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def median_time(fn: Callable[[], None], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_tokens_per_s(model, is_hf: bool, args, precision: str) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, args.vocab, (args.batch, args.seq_len), generator=g)
    shifted = torch.cat([x[:, 1:], torch.full((args.batch, 1), -100)], 1)

    def steps():
        for _ in range(args.train_steps):
            with autocast(precision):
                loss = model(x, labels=x).loss if is_hf else model(x, labels=shifted).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    t = median_time(steps, args.reps)
    model.eval()
    return args.batch * args.seq_len * args.train_steps / t


def gen_fn(model, is_hf: bool, batch: int, new_tokens: int, args, precision: str,
           inference: bool = True) -> Callable[[], None]:
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(1, args.vocab, (batch, args.prompt_len), generator=g)
    opts = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def run():
        with torch.inference_mode(inference), autocast(precision):
            if is_hf:
                model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=0)
            else:
                generate_batch(model, prompts.tolist(), opts, bos_id=0, eos_id=0, pad_id=0)

    return run


def hf_gen_time(hf, batch: int, new_tokens: int, args, precision: str, reps: int) -> float:
    """HF's faster of two ways to call ``generate``: inside ``torch.inference_mode()``, or with only
    its own ``no_grad`` (under bf16 autocast that is faster, since autocast caches its weight casts
    only outside inference mode). The reference gets its best, not the way that suits chatforge."""
    return min(median_time(gen_fn(hf, True, batch, new_tokens, args, precision, inference), reps)
               for inference in (True, False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="training batch size")
    ap.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    ap.add_argument("--train-steps", type=int, default=3, help="optimizer steps per timed repetition")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    mine, hf = build_pair(args)
    mine.eval()
    hf.eval()
    # Same weights, same outputs: the comparison is between implementations, not models.
    x = torch.randint(1, args.vocab, (2, 16))
    with torch.inference_mode():
        diff = (mine(x).logits - hf(x).logits).abs().max().item()
    assert diff < 1e-3, f"models disagree (max |logit diff| = {diff})"

    rows = []
    for precision in args.precisions.split(","):
        ours_t, hf_t = train_tokens_per_s(mine, False, args, precision), train_tokens_per_s(hf, True, args, precision)
        rows.append({"metric": "train tokens/s", "precision": precision, "batch": args.batch,
                     "chatforge": ours_t, "hf": hf_t, "ratio": ours_t / hf_t})
        for batch in (1, 8):
            n = batch * args.new_tokens
            ours = median_time(gen_fn(mine, False, batch, args.new_tokens, args, precision), args.reps)
            theirs = hf_gen_time(hf, batch, args.new_tokens, args, precision, args.reps)
            rows.append({"metric": "generate tokens/s", "precision": precision, "batch": batch,
                         "chatforge": n / ours, "hf": n / theirs, "ratio": theirs / ours})
            ours = median_time(gen_fn(mine, False, batch, 1, args, precision), args.reps * 3)
            theirs = hf_gen_time(hf, batch, 1, args, precision, args.reps * 3)
            rows.append({"metric": "TTFT ms", "precision": precision, "batch": batch,
                         "chatforge": ours * 1e3, "hf": theirs * 1e3, "ratio": theirs / ours})

    print(f"\nchatforge GPT-2 vs HF transformers {transformers.__version__} (torch {torch.__version__}, "
          f"{args.threads} threads): {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}")
    print("ratio = chatforge speed / HF speed (>1: chatforge faster; TTFT: HF time / chatforge time)\n")
    print(f"{'metric':<20}{'prec':<6}{'batch':>6}{'chatforge':>12}{'hf':>12}{'ratio':>8}")
    for r in rows:
        print(f"{r['metric']:<20}{r['precision']:<6}{r['batch']:>6}{r['chatforge']:>12.1f}{r['hf']:>12.1f}"
              f"{r['ratio']:>8.2f}")

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    result = {"benchmark": "gpt_vs_hf", "created": stamp, "args": {k: str(v) for k, v in vars(args).items()},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "cpu_count": os.cpu_count(), "rows": rows}
    path = args.out / f"gpt_vs_hf-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
