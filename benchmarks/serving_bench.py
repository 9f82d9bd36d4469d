"""Serving benchmark: the engine alone vs over gRPC, continuous batching, micro-batching, health under load.

One run measures, side by side, with real bundles (trained here on the shipped sample corpus,
``--size tiny`` or ``--size base``, unless ``--bundle``/``--classifier`` are given):

(a) engine-only vs over gRPC on loopback: time to first token (target: gRPC adds <= 2 ms) and
    the per-token streaming rate of one stream (target: gRPC >= 90% of the engine's). Measured in
    one server process with the production wiring (``grpc_path.py``): the same engine streams the
    same text directly on the server's event loop and over gRPC from this process, alternating
    text by text, so the paired difference is the gRPC path alone. (a') also reports the older
    comparison of an engine in this process with the CLI server: it also holds what separates the
    two processes (the same prefill ran 1-2 ms slower in one of them in some runs), so it is not
    judged;
(b) aggregate generation tokens/s with 8 concurrent streams vs one stream (target >= 3x:
    continuous batching runs the 8 sequences in one batched decoding step);
(c) Classify throughput with 32 concurrent callers vs sequential calls (target >= 3x:
    dynamic micro-batching);
(d) health Check p99 while 8 streams keep the server's CPU busy (target < 50 ms).

The server is a separate process (``chatforge serve``), as in production, so the client's
Python threads do not share a GIL with it. Replies have a fixed length
(``min_new_tokens = max_new_tokens``) so every stream does the same work. The machine may be
shared: the JSON records the load average before and after, and the server's CPU use in (d).

Torch threads: 1 by default, in the server and for the engine-only side alike. On a 2-core
machine two OpenMP threads spin on both cores and starve the event loop and gRPC's threads:
measured here, TTFT over gRPC went from ~4 ms to ~80 ms and tokens arrived in ~40 ms bursts;
with ``--torch-threads 2`` (results/serving-*-t2.json) the results are erratic: in one base run
8 streams made 52 tokens/s (449 with one thread), in the next a single stream made 4 tokens/s,
the OpenMP threads spinning against the client's and other processes' threads for two cores.

    python benchmarks/serving_bench.py --size base --workdir W   # train (or reuse W's), measure,
                                                                 # write runs/bench/serving-base.json (--publish: benchmarks/results/)
    python benchmarks/serving_bench.py --size tiny --torch-threads 2 --workdir W   # serving-tiny-t2.json
    python benchmarks/serving_bench.py --bundle B --classifier C --reps 30
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the _output module beside this script
from _output import add_output_options, output_path  # noqa: E402

READINESS = "chatforge.v1.Chatbot"
TARGETS = {  # metric -> (comparison, limit)
    "ttft_overhead_ms": ("<=", 2.0),
    "stream_rate_ratio": (">=", 0.9),
    "batching_ratio": (">=", 3.0),
    "classify_ratio": (">=", 3.0),
    "health_p99_ms": ("<", 50.0),
}


# ------------------------------------------------------------------------------ bundles
# Model sizes the benchmark trains here. "tiny" makes a token in ~1 ms on one core, so fixed
# per-message Python/gRPC costs dominate; "base" (d_model 512, 4+4 layers, vocab ~4000) is a
# realistic served size whose tokens take several ms, like the models users deploy. Replies
# have a fixed length (min_new_tokens = max_new_tokens), so a few training steps suffice: the
# benchmark measures serving, not reply quality.
SIZES = {
    "tiny": {"d_model": 128, "n_heads": 4, "layers": 2, "vocab": 1200, "steps": 200},
    "base": {"d_model": 512, "n_heads": 8, "layers": 4, "vocab": 4000, "steps": 30},
}


def train_bundle(workdir: Path, task: str, size: str, steps: int | None = None) -> Path:
    """Train (or reuse, when ``workdir`` already holds it) a transformer bundle of ``size``."""
    from chatforge.config import validate_config
    from chatforge.training.run import run_experiment

    spec = SIZES[size]
    steps = steps or spec["steps"]
    d_model = spec["d_model"]
    run_dir = workdir / f"run-{task}-{size}-{steps}"
    done = run_dir / "bundle" / "metadata.json"
    if done.is_file():  # bundles are written atomically: a present metadata.json is a whole bundle
        print(f"reusing {task} bundle {run_dir / 'bundle'}", flush=True)
        return run_dir / "bundle"
    model = {"family": "transformer", "task": task, "d_model": d_model, "n_heads": spec["n_heads"],
             "d_ff": 4 * d_model, "dropout": 0.1, "num_encoder_layers": spec["layers"]}
    if task == "generation":
        model["num_decoder_layers"] = spec["layers"]
    else:
        model["pooling"] = "mean"
    tree = {
        "name": f"serving-bench-{task}-{size}",
        "seed": 0,
        "data": {"path": "sample", "valid_fraction": 0.05, "test_fraction": 0.0,
                 "stratify": task == "classification"},
        "tokenizer": {"vocab_size": spec["vocab"], "on_vocab_too_large": "lower"},
        "model": model,
        "train": {"epochs": 1000, "max_steps": steps, "batch_size": 32, "lr": 2e-3, "max_source_len": 48,
                  "max_target_len": 64},
        "output": {"dir": str(workdir / "runs")},
        "tracking": {"enabled": False},
    }
    t0 = time.perf_counter()
    result = run_experiment(validate_config(tree), run_dir=run_dir)
    print(f"trained {task} bundle ({size}: {steps} steps, d_model {d_model}) in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return result.bundle_dir


def _describe(size: str, steps: int | None, task: str) -> str:
    spec = SIZES[size]
    layers = f"{spec['layers']}+{spec['layers']}" if task == "generation" else f"{spec['layers']}"
    return (f"trained here: {size}, transformer {task}, d_model {spec['d_model']}, {layers} layers, "
            f"vocab <= {spec['vocab']}, {steps or spec['steps']} steps, sample corpus")


def _vocab_size(bundle: Path) -> int | None:
    try:
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(bundle / "tokenizer.model")).get_piece_size()
    except (OSError, RuntimeError, ImportError):
        return None


# Why the targets are judged on one size and not the other, recorded with every result.
SIZE_NOTES = {
    "tiny": [
        "tiny: a token takes about 1 ms on one core, so fixed per-message Python/gRPC costs (a few "
        "tens of microseconds on each side, client included) weigh far more than with a served-size "
        "model; reported for comparison, the targets are judged on the base size",
    ],
    "base": [
        "base (d_model 512, 4+4 layers) is the realistic served size: its tokens take several ms, as "
        "with the models users deploy; the issue #5 targets are judged on this size",
    ],
}


# ------------------------------------------------------------------------------ helpers
def median(xs):
    return statistics.median(xs) if xs else None


def pct(xs, q: float):
    from chatforge.client.loadtest import percentile

    return percentile(xs, q)


def stream_timing(t_start: float, token_times: list[float]) -> dict:
    """TTFT and the per-token rate after the first token (tokens/s) of one stream."""
    n = len(token_times)
    span = token_times[-1] - token_times[0] if n > 1 else 0.0
    return {"ttft": token_times[0] - t_start, "tokens": n, "rate": (n - 1) / span if span > 0 else None}


class EngineSide:
    """(a) engine-only: the same Engine the server runs, driven on an event loop in this process."""

    def __init__(self, bundle: Path, new_tokens: int, precision: str = "fp32") -> None:
        from chatforge.decoding import GenerationOptions
        from chatforge.serving.engine import Engine

        self.engine = Engine.from_bundles({"chat": bundle}, max_running=8, precision=precision)
        self.opts = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        self.loop = asyncio.new_event_loop()

    def stream(self, text: str) -> dict:
        from chatforge.serving.engine import ReplyDone

        async def one() -> dict:
            t0 = time.perf_counter()
            times = []
            async for item in self.engine.stream_reply(text, self.opts):
                if not isinstance(item, ReplyDone):
                    times.append(time.perf_counter())
            return stream_timing(t0, times)

        return self.loop.run_until_complete(one())

    def close(self) -> None:
        self.engine.close()
        self.loop.close()


def engine_vs_grpc(engine: EngineSide, client, texts: list[str], reps: int, new_tokens: int,
                   block: int = 5) -> tuple[list[dict], list[dict]]:
    """(a) both sides, alternating in blocks of ``block`` streams: on a shared machine the load
    drifts over a run, and measuring one side after the other would hand the drift to one of
    them. The first stream after switching sides is not counted: measured here, a stream that
    follows the other process's stream is slower (its threads and weights went cold), by ~10 ms
    of time to first token with the base model, whichever side it is."""
    sides = {"engine": engine.stream, "grpc": lambda t: grpc_stream(client, t, new_tokens)}
    for text in texts[:3]:  # warm up (first calls allocate caches, load kernels, connect)
        for run in sides.values():
            run(text)
    out: dict[str, list[dict]] = {"engine": [], "grpc": []}
    for n, start in enumerate(range(0, reps, block)):
        for name in ("engine", "grpc") if n % 2 == 0 else ("grpc", "engine"):
            sides[name](texts[start % len(texts)])  # switching sides: not counted
            out[name] += [sides[name](texts[i % len(texts)]) for i in range(start, min(start + block, reps))]
    return out["engine"], out["grpc"]


def grpc_stream(client, text: str, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    times = []
    for chunk in client.reply_stream(text, max_new_tokens=new_tokens, min_new_tokens=new_tokens):
        if not chunk.is_final:
            times.append(time.perf_counter())
    return stream_timing(t0, times)


def cpu_model() -> dict:
    """The CPU as lscpu names it, and whether it has AMX: results differ a lot between machines
    (bf16 is fast only with AMX or AVX512-BF16), so every result records the one it came from."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"cpu_model": model, "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CliServer:
    """``chatforge serve`` in a subprocess on an ephemeral loopback gRPC port (``self.target``) with the given
    models and extra options; ``stop`` sends SIGTERM. Shared by this benchmark and http_vs_grpc.py."""

    def __init__(self, models: dict[str, Path], workdir: Path, torch_threads: int, precision: str,
                 extra: list[str]) -> None:
        port_file = workdir / "port"
        port_file.unlink(missing_ok=True)
        self.log = (workdir / "server.log").open("w")
        env = {**os.environ, "CHATFORGE_ENV": "test", "CHATFORGE_LOG_LEVEL": "WARNING",
               "OMP_NUM_THREADS": str(torch_threads)}
        model_args = [a for name, path in models.items() for a in ("--model", f"{name}={path}")]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatforge.cli", "serve", *model_args, "--port", "0", "--port-file",
             str(port_file), "--grace", "2", "--drain-delay", "0", "--max-running", "8", "--max-queued", "256",
             "--precision", precision, *extra],
            stdout=subprocess.DEVNULL, stderr=self.log, env=env, cwd=workdir,
        )
        deadline = time.monotonic() + 120
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start; see {workdir / 'server.log'}")
            time.sleep(0.1)  # polling the port file the server writes once SERVING (bounded)
        self.target = f"127.0.0.1:{port_file.read_text().strip()}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


class Server(CliServer):
    """The generator and the classifier served together, with the metrics port (batch sizes are read there)."""

    def __init__(self, gen: Path, cls: Path, workdir: Path, torch_threads: int, precision: str = "fp32") -> None:
        self.metrics_port = _free_port()
        super().__init__({"chat": gen, "intent": cls}, workdir, torch_threads, precision,
                         ["--metrics-port", str(self.metrics_port), "--max-batch-size", "32", "--max-wait-ms", "2"])

    def batch_sizes(self, model: str = "chat") -> tuple[float, float]:
        """(sum, count) of the server's decoding batch sizes so far (its Prometheus histogram)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        found = {}
        for line in text.splitlines():
            for part in ("sum", "count"):
                if line.startswith(f'chatforge_batch_size_{part}{{model="{model}"}}'):
                    found[part] = float(line.rsplit(" ", 1)[1])
        return found.get("sum", 0.0), found.get("count", 0.0)



def concurrent_streams(target: str, texts: list[str], streams: int, rounds: int, new_tokens: int) -> dict:
    """(b) ``streams`` threads each run ``rounds`` fixed-length replies; aggregate tokens/s."""
    from chatforge.client import ChatbotClient

    tokens = [0] * streams
    errors: list[BaseException] = []
    with ChatbotClient(target, timeout=300) as client:
        grpc_stream(client, texts[0], new_tokens)  # warm up the connection

        def worker(k: int) -> None:
            try:
                for r in range(rounds):
                    tokens[k] += grpc_stream(client, texts[(k * rounds + r) % len(texts)], new_tokens)["tokens"]
            except BaseException as e:  # noqa: BLE001 - reported in the results
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        wall = time.perf_counter() - t0
    return {"streams": streams, "rounds": rounds, "tokens": sum(tokens), "wall_s": wall,
            "tokens_per_s": sum(tokens) / wall, "errors": [repr(e) for e in errors[:3]]}


def classify_throughput(target: str, texts: list[str], concurrency: int, requests: int) -> dict:
    """(c) with the load-test library (the same numbers ``chatforge loadtest`` reports)."""
    from chatforge.client.loadtest import LoadTestConfig, run_load_test

    cfg = LoadTestConfig(target=target, rpc="classify", concurrency=concurrency, requests=requests,
                         connections=min(4, concurrency), texts=texts, model="intent", timeout=60.0)
    run_load_test(LoadTestConfig(**{**vars(cfg), "requests": min(requests, 20)}))  # warm up
    report = run_load_test(cfg)
    lat = report.latency()
    return {"concurrency": concurrency, "requests": report.count, "ok": report.ok,
            "status_codes": report.status_counts(), "throughput_rps": report.throughput,
            "latency_p50_ms": lat["p50"] * 1e3 if lat["p50"] is not None else None,
            "latency_p99_ms": lat["p99"] * 1e3 if lat["p99"] is not None else None}


def health_under_load(server: Server, texts: list[str], checks: int, new_tokens: int) -> dict:
    """(d) sequential readiness checks on their own connection (like a balancer's prober)
    while 8 streams keep the server generating."""
    import psutil

    from chatforge.client import ChatbotClient

    stop = threading.Event()
    streaming = threading.Barrier(9)
    produced = [0] * 8
    errors: list[BaseException] = []
    with ChatbotClient(server.target, timeout=300) as gen_client:

        def generate(k: int) -> None:
            first = True
            try:
                while not stop.is_set():
                    for chunk in gen_client.reply_stream(texts[k % len(texts)], max_new_tokens=new_tokens,
                                                         min_new_tokens=new_tokens):
                        if first:
                            first = False
                            streaming.wait(120)
                        produced[k] += not chunk.is_final
            except BaseException as e:  # noqa: BLE001 - reported in the results
                errors.append(e)
                if first:
                    streaming.abort()

        threads = [threading.Thread(target=generate, args=(k,), daemon=True) for k in range(8)]
        for t in threads:
            t.start()
        streaming.wait(120)  # every stream is producing tokens before the first check
        proc = psutil.Process(server.proc.pid)
        proc.cpu_percent(None)
        prober_opts = [("grpc.use_local_subchannel_pool", 1)]
        latencies, statuses = [], {}
        t_start = time.perf_counter()
        tokens_before = sum(produced)
        with ChatbotClient(server.target, timeout=10, options=prober_opts) as prober:
            prober.health(READINESS)  # connect outside the timed checks
            for _ in range(checks):
                t0 = time.perf_counter()
                status = prober.health(READINESS)
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
        window = time.perf_counter() - t_start
        server_cpu = proc.cpu_percent(None)
        tokens_during = sum(produced) - tokens_before
        stop.set()
        for t in threads:
            t.join(300)
    return {"checks": checks, "statuses": statuses, "p50_ms": median(latencies) * 1e3,
            "p99_ms": pct(latencies, 99) * 1e3, "max_ms": max(latencies) * 1e3, "window_s": window,
            "server_cpu_percent": server_cpu, "generated_tokens_per_s_meanwhile": tokens_during / window,
            "errors": [repr(e) for e in errors[:3]]}


# ------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="generation bundle to serve (default: train one here)")
    ap.add_argument("--classifier", type=Path, help="classification bundle (default: train one here)")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny",
                    help="size of the bundles trained here (see SIZES); ignored with --bundle/--classifier")
    ap.add_argument("--steps", type=int, help="training steps for bundles trained here (default: per size)")
    ap.add_argument("--train-only", action="store_true", help="train (or reuse) the bundles in --workdir and exit")
    ap.add_argument("--workdir", type=Path, help="keep trained bundles and the server log here (default: temp)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per reply (fixed length)")
    ap.add_argument("--reps", type=int, default=80, help="streams per side in (a)")
    ap.add_argument("--rounds", type=int, default=3, help="replies per stream in (b)")
    ap.add_argument("--classify-requests", type=int, default=640, help="calls per side in (c)")
    ap.add_argument("--health-checks", type=int, default=500, help="checks in (d)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads, engine-only and in the server (see the module docstring)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32",
                    help="served precision, engine-only and in the server (chatforge serve --precision)")
    add_output_options(ap, "serving-<size>[-t<threads>][-<precision>].json")
    args = ap.parse_args()
    name = "custom" if args.bundle else args.size
    suffix = ("" if args.torch_threads == 1 else f"-t{args.torch_threads}") + \
        ("" if args.precision == "fp32" else f"-{args.precision}")
    args.out = output_path(args, f"serving-{name}{suffix}.json")
    if args.train_only and args.workdir is None:
        ap.error("--train-only needs --workdir (where the bundles are kept)")

    import grpc
    import torch

    from chatforge.client.loadtest import load_texts

    load_start = os.getloadavg()
    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="serving-bench-")) if own_tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        gen = args.bundle or train_bundle(workdir, "generation", args.size, args.steps)
        cls = args.classifier or train_bundle(workdir, "classification", args.size, args.steps)
        if args.train_only:
            return
        vocab = _vocab_size(gen)
        texts = [t for t in load_texts() if 2 <= len(t) <= 60][:200]

        torch.set_num_threads(args.torch_threads)
        print("(a) engine vs over gRPC in one server process, alternating text by text ...", flush=True)
        from grpc_path import in_process_ab

        ab = in_process_ab(workdir, gen, texts[: args.reps], args.precision, args.new_tokens)
        server = Server(gen, cls, workdir, args.torch_threads, args.precision)
        try:
            from chatforge.client import ChatbotClient

            print(f"(a') engine in this process vs the server's over gRPC ({server.target}), interleaved ...",
                  flush=True)
            engine = EngineSide(gen, args.new_tokens, args.precision)
            try:
                with ChatbotClient(server.target, timeout=300) as client:
                    eng, rpc = engine_vs_grpc(engine, client, texts, args.reps, args.new_tokens)
            finally:
                engine.close()
            print("(b) 1 vs 8 concurrent streams ...", flush=True)
            single = concurrent_streams(server.target, texts, 1, args.rounds, args.new_tokens)
            before = server.batch_sizes()
            eight = concurrent_streams(server.target, texts, 8, args.rounds, args.new_tokens)
            after = server.batch_sizes()
            # Includes the warm-up stream and prefills (batches of the rows that joined together).
            eight["server_batches"] = after[1] - before[1]
            eight["server_mean_batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            print("(c) Classify: sequential vs 32 concurrent callers ...", flush=True)
            seq = classify_throughput(server.target, texts, 1, args.classify_requests // 4)
            par = classify_throughput(server.target, texts, 32, args.classify_requests)
            print("(d) health checks while 8 streams generate ...", flush=True)
            health = health_under_load(server, texts, args.health_checks, 4 * args.new_tokens)
        finally:
            server.stop()
        load_end = os.getloadavg()
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)

    eng_ttft = median([s["ttft"] for s in eng]) * 1e3
    rpc_ttft = median([s["ttft"] for s in rpc]) * 1e3
    # The overhead is the median of per-text differences: both sides stream the same texts in
    # the same order (engine_vs_grpc), and TTFT depends on the text (its prefill), so the TTFTs
    # of a run are bimodal here (~13 ms and ~18 ms with base). A difference of the two medians
    # then swings with which mode each median lands in (1.7 vs 2.4 ms on one run's data); the
    # paired median compares each text with itself. Both are reported.
    paired = [(r["ttft"] - e["ttft"]) * 1e3 for e, r in zip(eng, rpc, strict=True)]
    ttft_overhead = median(paired)
    eng_rate = median([s["rate"] for s in eng if s["rate"]])
    rpc_rate = median([s["rate"] for s in rpc if s["rate"]])
    summary = {
        "ttft_overhead_ms": ab["ttft_overhead_ms"],
        "stream_rate_ratio": ab["stream_rate_ratio"],
        "batching_ratio": eight["tokens_per_s"] / single["tokens_per_s"],
        "classify_ratio": par["throughput_rps"] / seq["throughput_rps"],
        "health_p99_ms": health["p99_ms"],
    }
    rows = [
        ("TTFT ms (median; paired)", "engine", ab["ttft_direct_ms"], "gRPC", ab["ttft_rpc_ms"], "ttft_overhead_ms"),
        ("stream tokens/s (1 stream)", "engine", ab["tokens_per_s_direct"], "gRPC", ab["tokens_per_s_rpc"],
         "stream_rate_ratio"),
        ("gen tokens/s aggregate", "1 stream", single["tokens_per_s"], "8 streams", eight["tokens_per_s"],
         "batching_ratio"),
        ("Classify calls/s", "sequential", seq["throughput_rps"], "32 callers", par["throughput_rps"],
         "classify_ratio"),
        ("health Check ms under load", "p50", health["p50_ms"], "p99", health["p99_ms"], "health_p99_ms"),
    ]
    passed = {}
    for key, (op, limit) in TARGETS.items():
        v = summary[key]
        passed[key] = v <= limit if op == "<=" else v >= limit if op == ">=" else v < limit

    cpu = cpu_model()
    print(f"\nchatforge serving benchmark: {cpu['cpu_model']} (AMX: {cpu['amx']}), {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, grpcio {grpc.__version__}; load average "
          f"{load_start[0]:.1f} -> {load_end[0]:.1f}")
    print(f"{'metric':<28}{'baseline':>12}{'value':>10}{'compared':>12}{'value':>10}  {'result':<26}{'target':<10}ok")
    for name, bl, bv, cl, cv, key in rows:
        op, limit = TARGETS[key]
        print(f"{name:<28}{bl:>12}{bv:>10.1f}{cl:>12}{cv:>10.1f}  {key + ' ' + format(summary[key], '.2f'):<26}"
              f"{op + ' ' + str(limit):<10}{'yes' if passed[key] else 'NO'}")

    result = {
        "benchmark": "serving",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), **cpu,
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "grpcio": grpc.__version__,
                    "loadavg_start": load_start, "loadavg_end": load_end},
        "settings": {"size": None if args.bundle else args.size,
                     "bundle": str(args.bundle) if args.bundle else _describe(args.size, args.steps, "generation"),
                     "classifier": str(args.classifier) if args.classifier else
                     _describe(args.size, args.steps, "classification"),
                     "vocab_size": vocab,
                     "torch_threads": args.torch_threads, "precision": args.precision, "new_tokens": args.new_tokens, "reps": args.reps,
                     "rounds": args.rounds, "classify_requests": args.classify_requests,
                     "health_checks": args.health_checks},
        "notes": [
            "client and server share this machine's cores: the client's threads (8 streams, 32 callers) "
            "take CPU from the server, so (b) and (c) understate a server with its own cores",
            *SIZE_NOTES.get(None if args.bundle else args.size, []),
        ],
        "per_token_ms": {"engine": 1e3 / ab["tokens_per_s_direct"], "grpc": 1e3 / ab["tokens_per_s_rpc"]},
        "summary": summary,
        "targets": {k: f"{op} {limit}" for k, (op, limit) in TARGETS.items()},
        "passed": passed,
        "a_engine_vs_grpc_in_server_process": ab,
        "a_cross_process": {
            "note": "the engine in the benchmark's process vs the CLI server over gRPC: also holds what "
                    "separates the two processes (the same prefill ran 1-2 ms slower in one of them in some "
                    "runs), so it is reported, not judged",
            "stream_rate_ratio": rpc_rate / eng_rate,
            "ttft_overhead_ms": {"paired_median": ttft_overhead, "difference_of_medians": rpc_ttft - eng_ttft,
                                 "paired_p25": pct(paired, 25), "paired_p75": pct(paired, 75)},
            "engine": {"ttft_ms_median": eng_ttft, "tokens_per_s_median": eng_rate,
                       "ttft_ms": [s["ttft"] * 1e3 for s in eng]},
            "grpc": {"ttft_ms_median": rpc_ttft, "tokens_per_s_median": rpc_rate,
                     "ttft_ms": [s["ttft"] * 1e3 for s in rpc]},
        },
        "b_continuous_batching": {"single": single, "eight": eight},
        "c_micro_batching": {"sequential": seq, "concurrent": par},
        "d_health_under_load": health,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
