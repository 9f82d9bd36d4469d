"""BERT training throughput: chatforge vs Hugging Face transformers, same config, same weights, same batch.

One training step = forward + backward + AdamW step, in train mode (dropout on). Tasks:
``mlm_nsp`` (chatforge BertForPreTraining vs HF BertForPreTraining) and ``classification``
(BertForSequenceClassification on both sides). CPU, fp32 and bf16 autocast. The two
implementations are measured in alternating rounds (so a noisy neighbour on a shared machine hurts
both alike) and the median round counts. Prints a table and writes JSON under runs/bench/ (``--publish``: benchmarks/results/).

    python benchmarks/bert_vs_hf.py                       # defaults: d=256, 4 layers, B=16, T=128
    python benchmarks/bert_vs_hf.py --tasks mlm_nsp --precisions fp32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from chatforge.interop.hf_bert import hf_state_dict
from chatforge.models.bert import BertConfig, BertForPreTraining, BertForSequenceClassification
from chatforge.models.bert.pipeline import mask_tokens
from chatforge.registry import SpecialIds

SPECIAL = SpecialIds(pad=0, bos=1, eos=2, unk=3, cls=4, sep=5, mask=6)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the _output module beside this script
from _output import add_output_options, output_path  # noqa: E402


def make_models(task: str, cfg: BertConfig, vocab: int, num_labels: int = 3):
    torch.manual_seed(0)
    if task == "mlm_nsp":
        mine = BertForPreTraining(cfg, vocab, SPECIAL)
        cls_name = "BertForPreTraining"
    else:
        mine = BertForSequenceClassification(cfg, vocab, SPECIAL, num_labels)
        cls_name = "BertForSequenceClassification"
    hf_cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_len, layer_norm_eps=cfg.layer_norm_eps, pad_token_id=SPECIAL.pad,
        num_labels=num_labels,
    )
    theirs = getattr(transformers, cls_name)(hf_cfg)
    theirs.load_state_dict({k: v.clone() for k, v in hf_state_dict(mine, task).items()}, strict=True)
    if task == "mlm_nsp":
        theirs.tie_weights()
    return mine, theirs


def make_batch(task: str, B: int, T: int, vocab: int, pad_fraction: float):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(7, vocab, (B, T), generator=g)
    ids[:, 0] = SPECIAL.cls
    half = T // 2
    ids[:, half] = SPECIAL.sep
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, half + 1:] = 1
    # Right padding on a fraction of rows, so masks are exercised as in real batches.
    for i in range(int(B * pad_fraction)):
        n = int(torch.randint(half + 2, T, (1,), generator=g))
        ids[i, n - 1] = SPECIAL.sep
        ids[i, n:] = SPECIAL.pad
        types[i, n:] = 0
    attn = (ids != SPECIAL.pad).long()
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": attn}
    if task == "mlm_nsp":
        batch["input_ids"], batch["labels"] = mask_tokens(ids, SPECIAL, vocab, generator=g)
        batch["next_sentence_label"] = torch.randint(0, 2, (B,), generator=g)
    else:
        batch["labels"] = torch.randint(0, 3, (B,), generator=g)
    return batch


def time_steps(model, batch, steps: int, precision: str) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
           else torch.autocast("cpu", enabled=False))

    def step():
        with ctx:
            out = model(**batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    step()  # warm-up: allocator, oneDNN primitive caches, optimizer state
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["mlm_nsp", "classification"],
                    choices=["mlm_nsp", "classification"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--pad-fraction", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    add_output_options(ap, "bert_vs_hf.json")
    args = ap.parse_args()
    args.out = output_path(args, "bert_vs_hf.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    from chatforge.runtime import cpu_info

    before = cpu_info()  # CPU model, flags, CPUs, threads, load: the machine the figures were measured on
    cfg = BertConfig(d_model=args.d_model, n_heads=args.heads, num_layers=args.layers, d_ff=4 * args.d_model,
                     dropout=0.1, max_len=max(512, args.seq))
    tokens = args.batch * args.seq * args.steps
    rows = []
    for task in args.tasks:
        batch = make_batch(task, args.batch, args.seq, args.vocab, args.pad_fraction)
        for precision in args.precisions:
            mine, theirs = make_models(task, cfg, args.vocab)
            times: dict[str, list[float]] = {"chatforge": [], "hf": []}
            for _ in range(args.rounds):
                times["chatforge"].append(time_steps(mine, batch, args.steps, precision))
                times["hf"].append(time_steps(theirs, batch, args.steps, precision))
            cf, hf = (tokens / statistics.median(times[k]) for k in ("chatforge", "hf"))
            rows.append({"task": task, "precision": precision, "chatforge_tokens_per_s": round(cf, 1),
                         "hf_tokens_per_s": round(hf, 1), "ratio": round(cf / hf, 3)})
            print(f"{task:15s} {precision:5s} chatforge {cf:10.0f} tok/s   hf {hf:10.0f} tok/s   "
                  f"ratio {cf / hf:5.2f}x", flush=True)
    result = {
        "benchmark": "bert training tokens/s (forward+backward+AdamW), chatforge vs HF transformers",
        "config": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads, "d_ff": 4 * args.d_model,
                   "vocab": args.vocab, "batch": args.batch, "seq": args.seq, "pad_fraction": args.pad_fraction,
                   "steps": args.steps, "rounds": args.rounds},
        "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads(), "cpu": before["model_name"]},
        "machine_before": before, "machine_after": cpu_info(),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    print(f"\n{'task':15s} {'prec':5s} {'chatforge':>12s} {'hf':>12s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['task']:15s} {r['precision']:5s} {r['chatforge_tokens_per_s']:12.0f} "
              f"{r['hf_tokens_per_s']:12.0f} {r['ratio']:6.2f}x")
    print(f"{before['model_name']}, {torch.get_num_threads()} threads, load {before['load_average']} -> "
          f"{result['machine_after']['load_average']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
