"""Serving speed by precision (fp32, bf16, int8) on the engine's served paths, same weights.

For a generation bundle: one stream at a time (tokens/s, time to first token) and 8 concurrent
streams through continuous batching (aggregate tokens/s); for a classification bundle: Classify one
caller at a time (batch 1) and 32 concurrent callers (micro-batched). Every reply is forced to the same
length (``min_new_tokens = max_new_tokens``) so precisions decode the same number of tokens. This is
the engine in-process (the path below gRPC, which adds the same cost at every precision:
``benchmarks/grpc_path.py``). Precisions interleave request by request (each prompt, group of streams or
Classify call runs on every precision in turn), so a change in the machine's load hits them alike; the
best round of each is reported, with ``chatforge.runtime.cpu_info()`` (CPU model,
flags, threads, load) before and after.

    python benchmarks/precision_speed.py --generator RUN/bundle --classifier RUN/bundle \
        --questions ../shared/data/chatbot_kr/ChatbotData.csv [--rounds 2] [--out FILE | --publish]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the _output module beside this script
from _output import add_output_options, output_path  # noqa: E402


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


def _interleaved(engines: dict, jobs: list, run) -> dict[str, tuple[int, float, list, float]]:
    """Run each job on every engine in turn (job 1 on all, then job 2, ...), the order rotating per job,
    so a change in the machine's load lands on every precision alike:
    {precision: (items, wall seconds, results, CPU seconds of the process)}. On a shared machine the CPU
    time is the steadier measure of the work done (wall time adds waiting for a core)."""
    totals = {p: [0, 0.0, [], 0.0] for p in engines}
    names = list(engines)
    for i, job in enumerate(jobs):
        for p in names[i % len(names):] + names[: i % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            n, res = asyncio.run(run(engines[p], job))
            totals[p][0] += n
            totals[p][1] += time.perf_counter() - t0
            totals[p][2].append(res)
            totals[p][3] += time.process_time() - c0
    return {p: (n, t, r, c) for p, (n, t, r, c) in totals.items()}


def measure_generation(engines: dict, texts: list[str], new_tokens: int, streams: int) -> dict[str, dict]:
    from chatforge.decoding import GenerationOptions

    opts = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    async def single(engine, text):
        n, first, _ = await _stream(engine, text, opts, "chat")
        return n, first

    async def concurrent(engine, group):
        done = await asyncio.gather(*(_stream(engine, t, opts, "chat") for t in group))
        return sum(n for n, _, _ in done), None

    for e in engines.values():  # warm-up
        asyncio.run(_stream(e, texts[0], opts, "chat"))
    one = _interleaved(engines, texts, single)
    groups = [(texts * streams)[i: i + streams] for i in range(0, len(texts), max(1, len(texts) // 4))][:4]
    many = _interleaved(engines, groups, concurrent)
    return {p: {"single_tokens_per_s": one[p][0] / one[p][1],
                "single_ttft_ms_p50": statistics.median(one[p][2]) * 1e3,
                "single_cpu_ms_per_token": one[p][3] / one[p][0] * 1e3,
                f"concurrent{streams}_tokens_per_s": many[p][0] / many[p][1],
                f"concurrent{streams}_cpu_ms_per_token": many[p][3] / many[p][0] * 1e3} for p in engines}


def measure_classify(engines: dict, texts: list[str], callers: int) -> dict[str, dict]:
    async def one(engine, text):
        await engine.classify([text], "intent")
        return 1, None

    async def concurrent(engine, group):
        await asyncio.gather(*(engine.classify([t], "intent") for t in group))
        return len(group), None

    for e in engines.values():  # warm-up
        asyncio.run(e.classify(texts[:2], "intent"))
    b1 = _interleaved(engines, texts, one)
    bn = _interleaved(engines, [texts[i: i + callers] for i in range(0, len(texts), callers)], concurrent)
    return {p: {"batch1_texts_per_s": b1[p][0] / b1[p][1], "batch1_ms_mean": b1[p][1] / b1[p][0] * 1e3,
                "batch1_cpu_ms_per_text": b1[p][3] / b1[p][0] * 1e3,
                f"callers{callers}_texts_per_s": bn[p][0] / bn[p][1],
                f"callers{callers}_cpu_ms_per_text": bn[p][3] / bn[p][0] * 1e3} for p in engines}


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
    add_output_options(ap, "precision-speed.json")
    args = ap.parse_args()
    args.out = output_path(args, "precision-speed.json")

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
        for _ in range(args.rounds):
            gen = measure_generation(engines, gen_texts, args.new_tokens, args.streams)
            cls = measure_classify(engines, cls_texts, args.callers)
            for p in args.precisions:
                rounds[p].append({**gen[p], **cls[p]})
                print(p, {k: round(v, 1) for k, v in rounds[p][-1].items()}, file=sys.stderr, flush=True)
    finally:
        for e in engines.values():
            e.close()
    lower_is_better = ("_ms_p50", "_ms_mean", "_per_token", "_per_text")
    best = {p: {k: (min if k.endswith(lower_is_better) else max)(x[k] for x in rs)
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
