"""chatforge GPT-2 vs Hugging Face ``GPT2LMHeadModel``: same config, same weights, one run, on CPU.

Measures, in fp32 and under bf16 autocast:

* training tokens/s: forward + backward + AdamW step on (batch, seq_len) random tokens;
* greedy generation tokens/s and time-to-first-token (TTFT) at batch 1 and batch 8:
  chatforge ``generate_batch`` vs HF ``generate(do_sample=False)``, both forced to produce exactly
  ``--new-tokens`` tokens (min = max), so the work is identical; TTFT is a 1-token generation.
  chatforge is called as a user calls it (``generate_batch`` inside inference mode and autocast);
  HF gets the faster of calling ``generate`` inside or outside inference mode.

Each measurement is repeated ``--reps`` times and the median kept. Prints a table with the
chatforge/HF ratios and writes JSON under runs/bench/ (``--publish``: benchmarks/results/). The machine is shared, so run it
when it is quiet and read the ratios (measured back to back) rather than the absolute numbers.

    python benchmarks/gpt_vs_hf.py [--layers 4 --d-model 256 --reps 3 --threads 2]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

import torch

from chatforge.bench.gpt_hf import greedy_fn, hf_gen_time, train_steps_fn
from chatforge.bench.timing import median_time
from chatforge.interop.hf_gpt import state_dict_from_hf
from chatforge.models.gpt import GPTConfig, GPTLMHeadModel
from chatforge.registry import SpecialIds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the _output module beside this script
from _output import add_output_options, output_path  # noqa: E402


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


def train_tokens_per_s(model, is_hf: bool, args, precision: str) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, args.vocab, (args.batch, args.seq_len), generator=g)
    t = median_time(train_steps_fn(model, is_hf, x, args.train_steps, precision), args.reps)
    model.eval()
    return args.batch * args.seq_len * args.train_steps / t


def prompts_for(batch: int, args) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(1, args.vocab, (batch, args.prompt_len), generator=g)


IDS = {"pad_id": 0, "bos_id": 0, "eos_id": 0}


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
    add_output_options(ap, "")  # a folder: gpt_vs_hf-<time>.json is written in it
    args = ap.parse_args()
    args.out = output_path(args, "")
    torch.set_num_threads(args.threads)

    import transformers

    from chatforge.runtime import cpu_info

    before = cpu_info()  # CPU model, flags, CPUs, threads, load: the machine the figures were measured on

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
            prompts = prompts_for(batch, args)
            ours = median_time(greedy_fn(mine, False, prompts, args.new_tokens, precision, **IDS), args.reps)
            theirs = hf_gen_time(hf, prompts, args.new_tokens, precision, args.reps, **IDS)
            rows.append({"metric": "generate tokens/s", "precision": precision, "batch": batch,
                         "chatforge": n / ours, "hf": n / theirs, "ratio": theirs / ours})
            ours = median_time(greedy_fn(mine, False, prompts, 1, precision, **IDS), args.reps * 3)
            theirs = hf_gen_time(hf, prompts, 1, precision, args.reps * 3, **IDS)
            rows.append({"metric": "TTFT ms", "precision": precision, "batch": batch,
                         "chatforge": ours * 1e3, "hf": theirs * 1e3, "ratio": theirs / ours})

    after = cpu_info()
    print(f"\nchatforge GPT-2 vs HF transformers {transformers.__version__} (torch {torch.__version__}, "
          f"{args.threads} threads): {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}")
    print(f"{before['model_name']}, {before['available_cpus']} CPUs available, load {before['load_average']} -> "
          f"{after['load_average']}")
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
              "cpu_count": os.cpu_count(), "machine_before": before, "machine_after": after, "rows": rows}
    path = args.out / f"gpt_vs_hf-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
