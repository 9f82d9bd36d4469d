"""Serving speed by precision (fp32, bf16, int8) on the engine's served paths, same weights.

For a generation bundle: one stream at a time (tokens/s, time to first token) and 8 concurrent
streams through continuous batching (aggregate tokens/s); for a classification bundle: Classify one
caller at a time (batch 1) and 32 concurrent callers (micro-batched). Every reply is forced to the same
length (``min_new_tokens = max_new_tokens``) so precisions decode the same number of tokens. This is
the engine in-process (the path below gRPC, which adds the same cost at every precision:
``benchmarks/grpc_path.py``). Precisions alternate round by round, so a change in the machine's load
hits them alike; the best round of each is reported, with ``chatforge.runtime.cpu_info()`` (CPU model,
flags, threads, load) before and after.

    python benchmarks/precision_speed.py --generator RUN/bundle --classifier RUN/bundle \
        --questions ../shared/data/chatbot_kr/ChatbotData.csv [--rounds 2] [--out results/precision-speed.json]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


async def _stream(engine, text, options, model) -> tuple[int, float, float]:
    from chatforge.inference import TokenDelta

    t0 = time.perf_counter()
    first, n = None, 0
    async for item in engine.stream_reply(text, options, model):
        if isinstance(item, TokenDelta):
            n += 1
            if first is None:
                first = time.perf_counter() - t0
    return n, first or 0.0, time.perf_counter() - t0


def measure_generation(engine, texts: list[str], new_tokens: int, streams: int) -> dict:
    from chatforge.decoding import GenerationOptions

    opts = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    async def single():
        return [await _stream(engine, t, opts, "chat") for t in texts]

    async def concurrent():
        return await asyncio.gather(*(_stream(engine, t, opts, "chat") for t in texts[: streams] * 2))

    asyncio.run(_stream(engine, texts[0], opts, "chat"))  # warm-up
    t0 = time.perf_counter()
    one = asyncio.run(single())
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    many = asyncio.run(concurrent())
    t_many = time.perf_counter() - t0
    return {"single_tokens_per_s": sum(n for n, _, _ in one) / t_one,
            "single_ttft_ms_p50": statistics.median(f for _, f, _ in one) * 1e3,
            f"concurrent{streams}_tokens_per_s": sum(n for n, _, _ in many) / t_many}


def measure_classify(engine, texts: list[str], callers: int) -> dict:
    async def one_by_one():
        for t in texts:
            await engine.classify([t], "intent")

    async def concurrent():
        for i in range(0, len(texts), callers):
            await asyncio.gather(*(engine.classify([t], "intent") for t in texts[i: i + callers]))

    asyncio.run(engine.classify(texts[:2], "intent"))  # warm-up
    t0 = time.perf_counter()
    asyncio.run(one_by_one())
    t1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    asyncio.run(concurrent())
    tn = time.perf_counter() - t0
    return {"batch1_texts_per_s": len(texts) / t1, "batch1_ms_mean": t1 / len(texts) * 1e3,
            f"callers{callers}_texts_per_s": len(texts) / tn}


def _questions(path: Path, n: int) -> list[str]:
    with path.open(encoding="utf-8") as f:
        rows = [r["Q"] for r in csv.DictReader(f)]
    return rows[-n:]  # the end of the file: different questions from the start the models saw most


def _clinc(path: Path, n: int) -> list[str]:
    return [t for t, _ in json.loads(path.read_text())["val"][:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generator", type=Path, required=True)
    ap.add_argument("--classifier", type=Path, required=True)
    ap.add_argument("--questions", type=Path, default=ROOT.parent / "shared/data/chatbot_kr/ChatbotData.csv")
    ap.add_argument("--clinc", type=Path, default=ROOT.parent / "shared/data/clinc150/data_full_trainval.json")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"])
    ap.add_argument("--texts", type=int, default=16, help="generation prompts per measurement")
    ap.add_argument("--cls-texts", type=int, default=256, help="Classify texts per measurement")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--callers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision-speed.json")
    args = ap.parse_args()

    from chatforge.runtime import configure_threads, cpu_info, set_omp_wait_policy

    set_omp_wait_policy()  # as the chatforge CLI does, before torch loads
    import torch

    from chatforge.serving.engine import Engine

    threads = configure_threads()
    before = cpu_info()
    from chatforge.inference import load_model

    # Only texts each model accepts whole (the engine refuses longer ones).
    fits = {role: load_model(b, role) for role, b in (("chat", args.generator), ("intent", args.classifier))}
    gen_texts = [t for t in _questions(args.questions, 4 * args.texts)
                 if fits["chat"].count_tokens(t) <= fits["chat"].max_input_tokens][-args.texts:]
    cls_texts = [t for t in _clinc(args.clinc, 2 * args.cls_texts)
                 if fits["intent"].count_tokens(t) <= fits["intent"].max_input_tokens][: args.cls_texts]
    engines = {p: Engine.from_bundles({"chat": args.generator, "intent": args.classifier}, precision=p,
                                      max_running=args.streams, max_queued=256)
               for p in args.precisions}
    rounds: dict[str, list[dict]] = {p: [] for p in args.precisions}
    try:
        for r in range(args.rounds):
            for p in args.precisions if r % 2 == 0 else reversed(args.precisions):
                res = {**measure_generation(engines[p], gen_texts, args.new_tokens, args.streams),
                       **measure_classify(engines[p], cls_texts, args.callers)}
                rounds[p].append(res)
                print(p, {k: round(v, 1) for k, v in res.items()}, file=sys.stderr, flush=True)
    finally:
        for e in engines.values():
            e.close()
    best = {p: {k: (min if k.endswith("_ms_p50") or k.endswith("_ms_mean") else max)(x[k] for x in rs)
                for k in rs[0]} for p, rs in rounds.items()}
    speedup = {p: {k: best[p][k] / best["fp32"][k] for k in best[p]} for p in best if "fp32" in best}
    out = {
        "benchmark": "precision_speed",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine_before": before, "machine_after": cpu_info(), "torch": torch.__version__, "torch_threads": threads,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "best": best, "ratio_to_fp32": speedup, "rounds": rounds,
        "note": "engine in-process (below gRPC); speedups < 1 are slower than fp32",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({"best": best, "ratio_to_fp32": speedup}, indent=1))


if __name__ == "__main__":
    main()
