"""GPT generation in the serving engine: continuous batching (``GPTStepModel``) against one decoding thread per
request, the engine's path for GPT before it had a step model (issue 16).

Both runners serve the same random-weight GPT-2 of ``configs/gpt_chatbot_kr.yaml``'s shape (the bundle and
prompts of ``benchmarks/served_generation.py``: 4 layers, d_model 256, SentencePiece vocabulary 8,000 trained on
its ChatbotData training split, its test questions), in this process, through ``Engine.stream_reply`` (no gRPC,
so the figure is the engine's; ``served_generation.py`` measures the served path). Engines: ``continuous`` and
``per-request`` (``Engine(continuous_batching=False)``), each at fp32 and int8. Cases: one stream (prompts one
after another) and 8 concurrent streams; greedy, at most ``new_tokens`` each; repetitions interleaved, a
warm-up round not timed. Greedy agreement is against ``per-request-fp32`` (each request decoded alone).

    nice -n 10 python benchmarks/gpt_batching.py --out benchmarks/results/gpt-batching [--size tiny]

Writes ``gpt-batching.json`` and ``gpt-batching.md`` under ``--out`` with the CPU model, load before and after
and whether the machine was loaded (then the figures are ratios only).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import served_generation as sg  # noqa: E402  (a sibling script: bundle, prompts, medians, agreement)

from chatforge.bench import served  # noqa: E402

CASES = ("1 stream", "concurrent")
ENGINES = {"continuous-fp32": (True, "fp32"), "per-request-fp32": (False, "fp32"),
           "continuous-int8": (True, "int8"), "per-request-int8": (False, "int8")}
REFERENCE = "per-request-fp32"


class InProcess:
    """One ``Engine`` hosting the bundle at a precision, with or without continuous batching."""

    def __init__(self, bundle: Path, continuous: bool, precision: str):
        from chatforge.inference import load_model
        from chatforge.serving.engine import Engine

        self.engine = Engine({"chat": load_model(bundle, "chat", precision=precision)}, {},
                             continuous_batching=continuous)
        self.kind = self.engine.runner_kind("chat")

    async def _stream(self, text: str, n: int) -> tuple[float, float, list[int]]:
        from chatforge.decoding import GenerationOptions
        from chatforge.inference import TokenDelta

        t0, first, ids = time.perf_counter(), None, []
        async for d in self.engine.stream_reply(text, GenerationOptions(max_new_tokens=n), model="chat"):
            if isinstance(d, TokenDelta):
                first = first if first is not None else time.perf_counter() - t0
                ids.append(d.token_id)
        return first or 0.0, time.perf_counter() - t0, ids

    async def run(self, case: str, prompts: list[str], n: int) -> dict[str, Any]:
        if case == "1 stream":
            outs = [await self._stream(p, n) for p in prompts]
            return sg._result(outs, sum(o[1] for o in outs))
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(self._stream(p, n) for p in prompts))
        return sg._result(list(outs), time.perf_counter() - t0)


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Continuous over per-request at each precision and case (> 1: continuous batching faster)."""
    by = {(r["engine"], r["case"]): r for r in rows}
    out = []
    for case in CASES:
        for precision in ("fp32", "int8"):
            c, p = by.get((f"continuous-{precision}", case)), by.get((f"per-request-{precision}", case))
            if c and p and p["tokens_per_s"] and c["ttft_ms"]:
                out.append({"case": case, "precision": precision, **served.speed_ratio(c, p)})
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# GPT in the engine: continuous batching vs one thread per request ({result['created']})", "",
             served.machine_line(result), "", sg.model_line(result["config"]), "",
             *sg.speed_table([{**r, "runner": result["runners"][r["engine"]]} for r in result["rows"]],
                             ["engine", "runner", "case"]),
             "", "Continuous batching over one thread per request (> 1: faster or sooner):", "",
             *sg.ratio_table(result["ratios"], ["case", "precision"]),
             *sg.agreement_lines(result["agreement"], REFERENCE)]
    return "\n".join(lines) + "\n"


def run(out: Path, size: sg.Size, reps: int | None = None) -> dict[str, Any]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `chatforge serve` sets it
    from chatforge.bench.machine import cpus_available, is_loaded, load_average

    reps = reps or size.reps
    texts, corpus, source = sg.prompts_and_corpus(size.single_prompts + size.concurrent)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="gpt-batching-") as tmp:
        bundle = sg.build_bundle(Path(tmp) / "bundle", size, corpus)
        engines = {name: InProcess(bundle, cont, prec) for name, (cont, prec) in ENGINES.items()}
        try:
            prompts = {"1 stream": texts[: size.single_prompts], "concurrent": texts[size.single_prompts:]}
            runs = served.interleaved_runs(engines, CASES, prompts, size.new_tokens, reps)
        finally:
            for e in engines.values():
                e.engine.close()
    load_after = load_average()
    ids = served.last_outputs(runs, CASES, "ids")
    rows = sg.summarize(runs)
    result: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": served.machine_record(load_before, load_after),
        "loaded": is_loaded([load_before, load_after], cpus_available()),
        "config": {"model": sg.FAMILIES["gpt"].describe(size), "new_tokens": size.new_tokens, "prompts": source,
                   "single_prompts": size.single_prompts, "concurrent_streams": size.concurrent, "reps": reps},
        "runners": {name: e.kind for name, e in engines.items()},
        "rows": rows, "ratios": ratios(rows), "agreement": sg.agreement(ids, REFERENCE), "raw": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpt-batching.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (out / "gpt-batching.md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", choices=sorted(sg.SIZES), default="full")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    result = run(args.out, sg.SIZES[args.size], args.reps)
    print(markdown(result))


if __name__ == "__main__":
    main()
