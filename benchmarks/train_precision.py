"""Training speed by precision on this machine: fp32 against bf16 autocast, and what ``train.precision: auto``
picks here, for the shipped configs' models.

The models are built from shipped configs (random weights, the configs' widths), and timed on random token ids
of the configs' lengths: forward + backward + AdamW, the Trainer's step. fp32 and bf16 interleave step group by
step group (``chatforge.bench.timing.interleaved``), so a change in the machine's load hits both alike; the
median group is reported with the bf16/fp32 time ratio and one (n, n) matmul's rate in each precision. The
machine (CPU model, flags, threads, load before and after) is recorded with the figures.

    python benchmarks/train_precision.py [--configs clinc150_transformer.yaml gpt_chatbot_kr.yaml]
        [--steps 3] [--repeats 3] [--out benchmarks/results/train-precision.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
from pathlib import Path

import torch

from chatforge.bench.machine import cpu_info, lscpu_model
from chatforge.bench.timing import interleaved, matmul_peak_flops
from chatforge.config import load_config
from chatforge.fileio import atomic_write_json
from chatforge.registry import BuildContext, SpecialIds, build_model
from chatforge.runtime import pick_train_precision, read_cpu_flags

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4000


def _model_and_batch(config: str, batch: int, seed: int = 0):
    """The config's model with random weights and a random batch of its task's shape."""
    cfg = load_config(ROOT / "configs" / config, ["tracking.enabled=false"])
    task = cfg.model.task
    labels = [f"l{i}" for i in range(151)] if task == "classification" else None
    torch.manual_seed(seed)
    ctx = BuildContext(task=task, vocab_size=VOCAB, special=SpecialIds(cls=4, sep=5, mask=6),
                       num_labels=len(labels) if labels else None)
    model = build_model(cfg.model.family, cfg.model.family_config(), ctx)
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(6, VOCAB, (batch, cfg.train.max_source_len), generator=g)
    if task == "classification":
        inputs = {"input_ids": src, "labels": torch.randint(0, len(labels), (batch,), generator=g)}
    else:
        tgt = torch.randint(6, VOCAB, (batch, cfg.train.max_target_len), generator=g)
        inputs = ({"input_ids": torch.cat([src, tgt], 1), "labels": torch.cat([torch.full_like(src, -100), tgt], 1)}
                  if cfg.model.family == "gpt" else
                  {"input_ids": src, "decoder_input_ids": tgt, "labels": tgt})
    return cfg, model, inputs


def _steps(model, inputs, steps: int, precision: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else \
        (lambda: torch.autocast("cpu", enabled=False))

    def run():
        for _ in range(steps):
            with ctx():
                loss = model(**inputs).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["clinc150_transformer.yaml", "gpt_chatbot_kr.yaml"])
    ap.add_argument("--batch", type=int, default=None, help="default: each config's train.batch_size")
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed group")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "train-precision.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    before = cpu_info()
    picked, reason = pick_train_precision(read_cpu_flags()[1])
    rows = []
    for config in args.configs:
        cfg, _, _ = _model_and_batch(config, 1)
        batch = args.batch or cfg.train.batch_size
        fns = {}
        for p in ("fp32", "bf16"):
            _, model, inputs = _model_and_batch(config, batch)  # same seed: the same weights for both
            fns[p] = _steps(model.train(), inputs, args.steps, p)
        times = interleaved(fns, args.repeats)
        med = {p: statistics.median(t) / args.steps for p, t in times.items()}
        rows.append({"config": config, "family": cfg.model.family, "task": cfg.model.task, "batch": batch,
                     "seconds_per_step": {p: round(v, 5) for p, v in med.items()},
                     "all_seconds": {p: [round(x, 4) for x in t] for p, t in times.items()},
                     "bf16_over_fp32_time": round(med["bf16"] / med["fp32"], 3)})
        print(f"{config}: fp32 {med['fp32'] * 1e3:.1f} ms/step, bf16 {med['bf16'] * 1e3:.1f} ms/step "
              f"({med['bf16'] / med['fp32']:.2f}x the time)", file=sys.stderr)
    matmul = {p: round(matmul_peak_flops(512, p) / 1e9, 2) for p in ("fp32", "bf16")}
    result = {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "lscpu_model": lscpu_model(),
              "machine_before": before, "machine_after": cpu_info(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "steps_per_group": args.steps, "repeats": args.repeats,
              "auto_picks": {"precision": picked, "reason": reason},
              "matmul_512_gflops": matmul, "matmul_bf16_over_fp32_rate": round(matmul["bf16"] / matmul["fp32"], 4),
              "rows": rows}
    atomic_write_json(args.out, result)
    print(json.dumps({"auto": picked, "matmul_gflops": matmul,
                      "ratios": {r["config"]: r["bf16_over_fp32_time"] for r in rows}}, indent=1))


if __name__ == "__main__":
    main()
