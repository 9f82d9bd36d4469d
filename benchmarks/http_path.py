"""Where the HTTP overhead on time to first token goes: the HTTP path, paired in one server process.

The twin of ``grpc_path.py``'s in-process A/B for the HTTP surface: one ``chatforge`` server process
with a real bundle serves both gRPC and HTTP (``http_port``), and the same process also drives the
same engine directly (a thread on the server's event loop). Each text is streamed three ways in a
rotating order: direct, gRPC (ChatbotClient), HTTP (the benchmark's ``RawSseClient``: http.client,
SSE lines). Paired per text, HTTP - direct and gRPC - direct are each surface's own path; the model
work is the same process's. Server-side timestamps (``time.perf_counter``, one clock for all
processes on Linux) split the HTTP path into stages: client send -> ASGI app -> handler (after the
body is read and validated) -> first body write -> client.

    python benchmarks/http_path.py --workdir W [--size tiny|base] [--reps 40]

W is a ``serving_bench.py``/``http_vs_grpc.py --workdir`` (its bundles are reused, or trained there).
Writes ``runs/bench/http-path-<size>.json`` (``--publish``: ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _output import add_output_options, output_path, write_result  # noqa: E402
from grpc_path import _ms, _rate, _spawn, _stream, serve_with_direct_path  # noqa: E402


def _serve_model(bundle: str, port_file: str, http_port: int, new_tokens: int) -> None:
    """The real server with both surfaces; stdin lines are texts to stream directly (answered on stdout)."""
    import torch
    from fastapi import FastAPI

    from chatforge.decoding import GenerationOptions
    from chatforge.serving import http
    from chatforge.serving.engine import Engine
    from chatforge.serving.server import operations
    from chatforge.settings import get_settings

    torch.set_num_threads(1)
    arrivals: list[float] = []
    stamps: list[dict] = []
    app_call = FastAPI.__call__

    async def timed_app(self, scope, receive, send):  # the request reaches the ASGI app
        if scope.get("path") == "/v1/chat/completions":
            arrivals.append(time.perf_counter())
        return await app_call(self, scope, receive, send)

    FastAPI.__call__ = timed_app
    handler = http.HttpSurface.chat_completions

    async def timed_handler(self, request, body):  # body read and validated
        stamps.append({"handler": time.perf_counter()})
        return await handler(self, request, body)

    http.HttpSurface.chat_completions = timed_handler
    sse_call = http.SseResponse.__call__

    async def timed_sse(self, scope, receive, send):
        rec = stamps[-1] if stamps else {}

        async def stamped_send(message):
            if message["type"] == "http.response.body" and "first_write" not in rec:
                rec["first_write"] = time.perf_counter()
            await send(message)

        return await sse_call(self, scope, receive, stamped_send)

    http.SseResponse.__call__ = timed_sse
    ops = operations(get_settings())  # metrics, alerts, conversation store: as `chatforge serve` runs
    engine = Engine.from_bundles({"chat": bundle}, max_running=8, metrics=ops["metrics"])
    opts = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    serve_with_direct_path(engine, opts, port_file, ops, stamps, arrivals, http_port=http_port)


def in_process_abc(workdir: Path, bundle: Path, texts: list[str], new_tokens: int) -> dict:
    from http_vs_grpc import RawSseClient
    from serving_bench import _free_port

    from chatforge.client import ChatbotClient

    port_file, http_port = workdir / "http-path.port", _free_port()
    proc, grpc_target = _spawn(["--_model", str(bundle), str(port_file), str(http_port), str(new_tokens)], workdir,
                               port_file, script=__file__, log_name="http-path-server.log")

    def direct(text: str) -> tuple[float, float, float, int]:
        proc.stdin.write(json.dumps(text) + "\n")
        proc.stdin.flush()
        return tuple(json.loads(proc.stdout.readline()))

    http_client = RawSseClient(f"127.0.0.1:{http_port}")
    try:
        with ChatbotClient(grpc_target, timeout=300) as grpc_client:
            runs: dict[str, list] = {"direct": [], "grpc": [], "http": []}
            for text in texts[:3]:  # warm up all paths (not counted; the server's stamps are cut below)
                _stream(grpc_client, text, new_tokens), _stream(http_client, text, new_tokens), direct(text)
            for i, text in enumerate(texts):
                order = [("direct", lambda t=text: direct(t)),
                         ("grpc", lambda t=text: _stream(grpc_client, t, new_tokens)),
                         ("http", lambda t=text: _stream(http_client, t, new_tokens))]
                for name, run in order[i % 3:] + order[:i % 3]:  # rotate which path goes first
                    runs[name].append(run())
        proc.stdin.write("null\n")
        proc.stdin.flush()
        server = json.loads(proc.stdout.readline())
    finally:
        http_client.close()
        proc.wait(60)
    stamps, arrivals = server["stamps"][-len(texts):], server["arrivals"][-len(texts):]
    first = {k: [c[1] - c[0] for c in v] for k, v in runs.items()}
    rate = {k: statistics.median(_rate(c) for c in v) for k, v in runs.items()}
    http_runs = runs["http"]
    return {
        "ttft_ms": {k: _ms(v) for k, v in first.items()},
        "ttft_overhead_ms": {k: _ms([a - d for a, d in zip(first[k], first["direct"], strict=True)])
                             for k in ("grpc", "http")},
        "ttft_http_minus_grpc_ms": _ms([h - g for h, g in zip(first["http"], first["grpc"], strict=True)]),
        "tokens_per_s": rate,
        "http_stages_ms": {
            "client_to_app": _ms([a - c[0] for a, c in zip(arrivals, http_runs, strict=True)]),
            "app_to_handler": _ms([s["handler"] - a for s, a in zip(stamps, arrivals, strict=True)]),
            "handler_to_first_write": _ms([s["first_write"] - s["handler"] for s in stamps]),
            "first_write_to_client": _ms([c[1] - s["first_write"] for s, c in zip(stamps, http_runs, strict=True)]),
        },
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_model":
        return _serve_model(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    from serving_bench import SIZES, train_bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="bundles are kept (or found) here")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--reps", type=int, default=40, help="texts per path")
    ap.add_argument("--new-tokens", type=int, default=32)
    add_output_options(ap, "http-path-<size>.json")
    args = ap.parse_args()
    out = output_path(args, f"http-path-{args.size}.json")
    from chatforge.client.loadtest import load_texts
    from chatforge.runtime import cpu_info

    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = train_bundle(args.workdir, "generation", args.size)
    texts = [t for t in load_texts() if 2 <= len(t) <= 60][: args.reps]
    load_start = os.getloadavg()
    abc = in_process_abc(args.workdir, bundle, texts, args.new_tokens)
    result = {
        "benchmark": "http_path",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "cpu": cpu_info()},  # CPU model and flags, CPUs available, torch threads
        "settings": {"size": args.size, "reps": len(texts), "new_tokens": args.new_tokens,
                     "http_client": "RawSseClient (http.client)", "grpc_client": "ChatbotClient (grpcio C core)"},
        "in_process": abc,
    }
    t, o = abc["ttft_ms"], abc["ttft_overhead_ms"]
    print(f"{args.size}: TTFT direct {t['direct']:.2f} ms, gRPC {t['grpc']:.2f} ms (+{o['grpc']:.2f} paired), "
          f"HTTP {t['http']:.2f} ms (+{o['http']:.2f} paired); HTTP - gRPC {abc['ttft_http_minus_grpc_ms']:+.2f} ms")
    print("  streamed tokens/s: " + ", ".join(f"{k} {v:.1f}" for k, v in abc["tokens_per_s"].items()))
    for stage, ms in abc["http_stages_ms"].items():
        print(f"  HTTP {stage:<24}{ms:8.2f} ms")
    write_result(out, result)


if __name__ == "__main__":
    main()
