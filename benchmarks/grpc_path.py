"""Where the gRPC overhead on time to first token goes: the gRPC path alone, isolated.

``serving_bench.py`` compares the engine in the benchmark's process with the server in another
process. That difference also holds whatever separates the two processes (the same prefill ran
1-2 ms slower in one than in the other in some runs here). This benchmark removes it:

(1) echo: a grpc.aio server with chatforge's server options and interceptor that answers at once,
    no model: the time to first message of bare Python gRPC on loopback on this machine;
(2) in-process A/B: one ``chatforge`` server process with a real bundle serves Reply over gRPC, and
    the same process drives the same engine directly (a thread on the server's event loop),
    alternating text by text. Paired per text, the difference is the gRPC path alone: the model
    work is the same process's. Server-side timestamps (``time.perf_counter``, one clock for all
    processes on Linux) split the path into stages.

    python benchmarks/grpc_path.py --workdir W [--size base] [--precision bf16] [--reps 40]

W is a ``serving_bench.py --workdir`` (its bundles are reused, or trained there).
Writes ``runs/bench/grpc-path-<size>[-bf16].json`` (``--publish``: ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _output import add_output_options, output_path, write_result  # noqa: E402

ECHO_TOKENS = 33


def _ms(xs) -> float:
    return statistics.median(xs) * 1e3


# ------------------------------------------------------------------------------ server side
def _serve_echo(port_file: str) -> None:
    """(1): answers every Reply with ECHO_TOKENS chunks at once; records handler entry times."""
    import grpc

    from chatforge.serving.interceptors import CallGate, RequestContextInterceptor
    from chatforge.serving.server import SERVER_OPTIONS
    from chatforge.v1 import chatbot_pb2 as pb
    from chatforge.v1 import chatbot_pb2_grpc as pb_grpc

    entries: list[float] = []

    class Echo(pb_grpc.ChatbotServicer):
        async def Reply(self, request, context):
            entries.append(time.perf_counter())
            for i in range(ECHO_TOKENS - 1):
                await context.write(pb.ReplyChunk(delta=pb.ReplyDelta(text="x", token_id=i)))
            await context.write(pb.ReplyChunk(final=pb.ReplyFinal(finish_reason="length")))

    async def main() -> None:
        server = grpc.aio.server(interceptors=[RequestContextInterceptor(gate=CallGate())],
                                 options=list(SERVER_OPTIONS))
        pb_grpc.add_ChatbotServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(str(port))
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # until told to stop
        print(json.dumps({"entries": entries}), flush=True)
        await server.stop(0)

    asyncio.run(main())


def _serve_model(bundle: str, port_file: str, precision: str, new_tokens: int) -> None:
    """(2): the real server; stdin lines are texts to stream directly (answered on stdout)."""
    import torch

    from chatforge.decoding import GenerationOptions
    from chatforge.serving import interceptors, service
    from chatforge.serving.engine import Engine
    from chatforge.serving.server import operations
    from chatforge.settings import get_settings

    torch.set_num_threads(1)
    stamps: list[dict] = []
    reply = service.ChatbotServicer.Reply

    async def timed_reply(self, request, context):  # stage stamps around the servicer
        rec = {"entry": time.perf_counter()}
        stamps.append(rec)
        write = context.write

        async def first_write(msg):
            if "write_start" not in rec:
                rec["write_start"] = time.perf_counter()
            await write(msg)

        context.write = first_write
        return await reply(self, request, context)

    service.ChatbotServicer.Reply = timed_reply
    intercept = interceptors.RequestContextInterceptor.intercept_service
    arrivals: list[float] = []

    async def timed_intercept(self, continuation, details):
        arrivals.append(time.perf_counter())
        return await intercept(self, continuation, details)

    interceptors.RequestContextInterceptor.intercept_service = timed_intercept
    ops = operations(get_settings())  # metrics, alerts, conversation store: as `chatforge serve` runs
    engine = Engine.from_bundles({"chat": bundle}, max_running=8, precision=precision, metrics=ops["metrics"])
    opts = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    serve_with_direct_path(engine, opts, port_file, ops, stamps, arrivals)


def serve_with_direct_path(engine, opts, port_file: str, ops: dict, stamps: list, arrivals: list,
                           **serve_kwargs) -> None:
    """Serve ``engine`` as `chatforge serve` wires it; each text read on stdin is also streamed directly from the
    engine on the server's own loop and its (start, first, last, count) written to stdout; ``null`` ends the run
    (the server's stage stamps are written, then SIGTERM drains it). Shared by grpc_path and http_path."""
    from chatforge.serving.engine import ReplyDone
    from chatforge.serving.server import serve

    def director(loop) -> None:
        for line in sys.stdin:
            text = json.loads(line)
            if text is None:
                break

            async def one(text: str = text) -> list[float]:
                t0, times = time.perf_counter(), []
                async for item in engine.stream_reply(text, opts):
                    if not isinstance(item, ReplyDone):
                        times.append(time.perf_counter())
                return [t0, times[0], times[-1], len(times)]

            print(json.dumps(asyncio.run_coroutine_threadsafe(one(), loop).result()), flush=True)
        print(json.dumps({"stamps": stamps, "arrivals": arrivals}), flush=True)
        os.kill(os.getpid(), 15)  # SIGTERM: the server drains and returns

    async def main() -> None:
        threading.Thread(target=director, args=(asyncio.get_running_loop(),), daemon=True).start()
        try:
            await serve(engine, port=0, port_file=port_file, grace=2, **serve_kwargs, **ops)
        finally:
            ops["store"].close()
            ops["alerts"].close()

    asyncio.run(main())


# ------------------------------------------------------------------------------ client side
def _spawn(args: list[str], workdir: Path, port_file: Path, script: str = __file__,
           log_name: str = "grpc-path-server.log") -> tuple[subprocess.Popen, str]:
    port_file.unlink(missing_ok=True)
    env = {**os.environ, "CHATFORGE_ENV": "test", "CHATFORGE_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=(workdir / log_name).open("w"), text=True, env=env)
    deadline = time.monotonic() + 120
    while not (port_file.is_file() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start; see {workdir / log_name}")
        time.sleep(0.05)  # polling the port file the server writes once serving (bounded)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def _stream(client, text: str, new_tokens: int) -> tuple[float, float, float, int]:
    """(start, first token, last token, tokens) of one streamed reply."""
    t0, times = time.perf_counter(), []
    for chunk in client.reply_stream(text, max_new_tokens=new_tokens, min_new_tokens=new_tokens):
        if not chunk.is_final:
            times.append(time.perf_counter())
    return t0, times[0], times[-1], len(times)


def _rate(stream) -> float:
    """Tokens per second after the first token."""
    _, first, last, n = stream
    return (n - 1) / (last - first)


def echo_baseline(workdir: Path, reps: int) -> dict:
    from chatforge.client import ChatbotClient

    proc, target = _spawn(["--_echo", str(workdir / "echo.port")], workdir, workdir / "echo.port")
    try:
        with ChatbotClient(target) as client:
            for _ in range(20):
                _stream(client, "hi", ECHO_TOKENS)
            calls = [_stream(client, "hi", ECHO_TOKENS) for _ in range(reps)]
        proc.stdin.write("\n")
        proc.stdin.flush()
        entries = json.loads(proc.stdout.readline())["entries"][-reps:]
    finally:
        proc.wait(30)
    return {"ttft_ms": _ms([c[1] - c[0] for c in calls]),
            "client_to_handler_ms": _ms([e - c[0] for e, c in zip(entries, calls, strict=True)])}


def in_process_ab(workdir: Path, bundle: Path, texts: list[str], precision: str, new_tokens: int) -> dict:
    from chatforge.client import ChatbotClient

    proc, target = _spawn(["--_model", str(bundle), str(workdir / "model.port"), precision, str(new_tokens)],
                          workdir, workdir / "model.port")

    def direct(text: str) -> tuple[float, float, float, int]:
        proc.stdin.write(json.dumps(text) + "\n")
        proc.stdin.flush()
        return tuple(json.loads(proc.stdout.readline()))

    try:
        with ChatbotClient(target, timeout=300) as client:
            for text in texts[:3]:  # warm up both paths
                _stream(client, text, new_tokens)
                direct(text)
            rpc, dir_ = [], []
            for i, text in enumerate(texts):  # alternate which path goes first
                pair = [lambda t=text: rpc.append(_stream(client, t, new_tokens)),
                        lambda t=text: dir_.append(direct(t))]
                for run in pair if i % 2 == 0 else pair[::-1]:
                    run()
        proc.stdin.write("null\n")
        proc.stdin.flush()
        server = json.loads(proc.stdout.readline())
    finally:
        proc.wait(60)
    stamps, arrivals = server["stamps"][-len(texts):], server["arrivals"][-len(texts):]
    first_rpc = [c[1] - c[0] for c in rpc]
    first_dir = [c[1] - c[0] for c in dir_]
    rate_rpc = statistics.median(_rate(c) for c in rpc)
    rate_dir = statistics.median(_rate(c) for c in dir_)
    return {
        "ttft_rpc_ms": _ms(first_rpc),
        "ttft_direct_ms": _ms(first_dir),
        "ttft_overhead_ms": _ms([r - d for r, d in zip(first_rpc, first_dir, strict=True)]),  # paired per text
        "tokens_per_s_rpc": rate_rpc,
        "tokens_per_s_direct": rate_dir,
        "stream_rate_ratio": rate_rpc / rate_dir,
        "stages_ms": {
            "client_to_interceptor": _ms([a - c[0] for a, c in zip(arrivals, rpc, strict=True)]),
            "interceptor_to_servicer": _ms([s["entry"] - a for s, a in zip(stamps, arrivals, strict=True)]),
            "servicer_to_first_write": _ms([s["write_start"] - s["entry"] for s in stamps]),
            "first_write_to_client": _ms([c[1] - s["write_start"] for s, c in zip(stamps, rpc, strict=True)]),
        },
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_echo":
        return _serve_echo(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "--_model":
        return _serve_model(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    from serving_bench import SIZES, train_bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="bundles are kept (or found) here")
    ap.add_argument("--size", choices=sorted(SIZES), default="base")
    ap.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32")
    ap.add_argument("--reps", type=int, default=40, help="texts per path")
    ap.add_argument("--new-tokens", type=int, default=32)
    add_output_options(ap, "grpc-path-<size>[-<precision>].json")
    args = ap.parse_args()
    suffix = "" if args.precision == "fp32" else f"-{args.precision}"
    out = output_path(args, f"grpc-path-{args.size}{suffix}.json")
    from chatforge.client.loadtest import load_texts
    from chatforge.runtime import cpu_info

    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = train_bundle(args.workdir, "generation", args.size)
    texts = [t for t in load_texts() if 2 <= len(t) <= 60][: args.reps]
    load_start = os.getloadavg()
    echo = echo_baseline(args.workdir, 100)
    ab = in_process_ab(args.workdir, bundle, texts, args.precision, args.new_tokens)
    result = {
        "benchmark": "grpc_path",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "cpu": cpu_info()},  # CPU model and flags, CPUs available, torch threads
        "settings": {"size": args.size, "precision": args.precision, "reps": len(texts),
                     "new_tokens": args.new_tokens},
        "echo_no_model": echo,
        "in_process_ab": ab,
    }
    print(f"echo (no model): first message {echo['ttft_ms']:.2f} ms, client -> handler "
          f"{echo['client_to_handler_ms']:.2f} ms")
    print(f"{args.size} {args.precision}: TTFT over gRPC {ab['ttft_rpc_ms']:.2f} ms, direct in the same process "
          f"{ab['ttft_direct_ms']:.2f} ms; gRPC overhead (paired) {ab['ttft_overhead_ms']:.2f} ms (target <= 2)")
    print(f"  streamed tokens/s: gRPC {ab['tokens_per_s_rpc']:.1f}, direct {ab['tokens_per_s_direct']:.1f} "
          f"({ab['stream_rate_ratio']:.2f}x, target >= 0.9)")
    for stage, ms in ab["stages_ms"].items():
        print(f"  {stage:<26}{ms:8.2f} ms")
    write_result(out, result)


if __name__ == "__main__":
    main()
