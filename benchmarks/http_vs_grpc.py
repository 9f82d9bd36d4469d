"""HTTP (OpenAI-compatible SSE) vs gRPC streaming, side by side, against ONE server process.

``chatforge serve --http-port`` serves both surfaces from one process, one event loop and one
engine; this benchmark streams the same texts over both, interleaved, from one client process:

(1) one stream at a time: time to first token (target: HTTP adds <= 2 ms over gRPC; the paired
    median of per-text differences, since TTFT depends on the text's prefill) and the per-stream
    token rate. The sides alternate in blocks of ``block`` streams (the first stream after a
    switch is not counted), so a load drift on a shared machine does not land on one side;
(2) 8 concurrent streams: aggregate tokens/s (target: HTTP >= 90% of gRPC), rounds alternating
    between the surfaces, median over rounds.

Replies have a fixed length (``min_new_tokens = max_new_tokens``; ``min_tokens`` over HTTP) so
both sides do the same work. The gRPC side uses ChatbotClient (grpc's C core, one HTTP/2 channel).
The HTTP side uses :class:`RawSseClient` (``http.client``, HTTP/1.1 keep-alive, one connection per
stream, TCP_NODELAY, reading the SSE ``data:`` lines) so that the client's own cost is comparable;
``--http-client httpx`` uses chatforge.client.http (httpx), what ``chatforge loadtest --protocol
http`` uses, which adds about 1 ms of client-side Python per request. The JSON records the CPU model (lscpu),
threads and the load average before and after: the machine may be shared.

    python benchmarks/http_vs_grpc.py --size tiny --workdir W   # train (or reuse W's) and measure
    python benchmarks/http_vs_grpc.py --size base --workdir W --out benchmarks/results/http_vs_grpc-base.json
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _output import add_output_options, output_path  # noqa: E402
from serving_bench import CliServer, _describe, _free_port, stream_timing, train_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"ttft_overhead_ms": ("<=", 2.0), "concurrent_tokens_ratio": (">=", 0.9)}


def lscpu() -> dict:
    """CPU model, sockets/cores/threads as lscpu reports them (empty where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)")
    return {k: fields[k].strip() for k in keep if k in fields}


class Server(CliServer):
    """``chatforge serve`` with both surfaces, in a subprocess, on loopback."""

    def __init__(self, gen: Path, workdir: Path, torch_threads: int, precision: str) -> None:
        self.http_port = _free_port()
        super().__init__({"chat": gen}, workdir, torch_threads, precision, ["--http-port", str(self.http_port)])
        self.grpc_target = self.target
        self.http_target = f"127.0.0.1:{self.http_port}"


class RawSseClient:
    """The benchmark's HTTP client: standard HTTP/1.1 (``http.client``, keep-alive, one connection
    per thread, TCP_NODELAY) reading the SSE ``data:`` lines of ``POST /v1/chat/completions`` with
    ``stream: true`` — what any OpenAI-compatible client receives, parsed with ``json.loads``.

    Why not HttpChatClient (httpx): the gRPC side is grpc's C core, so a pure-Python httpx stack on
    the client side (about 1 ms per request here: request building, h11's parser, its chunk
    iterators) would be counted as "HTTP overhead" of the server. This reader costs a
    ``readline`` per SSE line. ``--http-client httpx`` measures with HttpChatClient instead."""

    def __init__(self, target: str, timeout: float = 300.0) -> None:
        self.host, port = target.rsplit(":", 1)
        self.port, self.timeout = int(port), timeout
        self._local = threading.local()

    def _conn(self):
        import http.client
        import socket

        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.conn = conn
        return conn

    def reply_stream(self, text: str, *, max_new_tokens: int, min_new_tokens: int):
        from chatforge.client.http import HttpChatError, HttpChunk

        body = json.dumps({"messages": [{"role": "user", "content": text}], "stream": True,
                           "max_tokens": max_new_tokens, "min_tokens": min_new_tokens}).encode()
        conn = self._conn()
        try:
            # bytes body: http.client sends headers and body in one write
            conn.request("POST", "/v1/chat/completions", body=body,
                         headers={"content-type": "application/json"})
            response = conn.getresponse()
        except (OSError, ConnectionError):
            self._local.conn = None
            conn.close()
            raise
        if response.status != 200:
            raise HttpChatError(response.status, response.read()[:200].decode(errors="replace"))
        finish = None
        while True:
            line = response.readline()
            if not line:
                break
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise HttpChatError(200, chunk["error"].get("message", ""), chunk["error"].get("code"))
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if "content" in delta and "role" not in delta:  # one chunk per token; not the role chunk
                    yield HttpChunk(text=delta["content"] or "")
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        response.read()  # the chunked body's terminator: the connection is reusable
        yield HttpChunk(is_final=True, finish_reason=finish)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


def one_stream(client, text: str, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    times = []
    for chunk in client.reply_stream(text, max_new_tokens=new_tokens, min_new_tokens=new_tokens):
        if not chunk.is_final:
            times.append(time.perf_counter())
    return stream_timing(t0, times)


def single_streams(clients: dict, texts: list[str], reps: int, new_tokens: int, block: int = 5) -> dict:
    """(1) both surfaces, alternating in blocks; the same texts in the same order on each side."""
    for text in texts[:3]:  # warm up: connections, caches
        for c in clients.values():
            one_stream(c, text, new_tokens)
    out: dict[str, list[dict]] = {name: [] for name in clients}
    names = list(clients)
    for n, start in enumerate(range(0, reps, block)):
        for name in names if n % 2 == 0 else names[::-1]:
            one_stream(clients[name], texts[start % len(texts)], new_tokens)  # after a switch: not counted
            out[name] += [one_stream(clients[name], texts[i % len(texts)], new_tokens)
                          for i in range(start, min(start + block, reps))]
    return out


def concurrent_round(client, texts: list[str], streams: int, per_stream: int, new_tokens: int,
                     offset: int) -> dict:
    """``streams`` threads, each streaming ``per_stream`` replies; aggregate tokens/s."""
    tokens = [0] * streams
    errors: list[str] = []

    def worker(k: int) -> None:
        try:
            for r in range(per_stream):
                text = texts[(offset + k * per_stream + r) % len(texts)]
                tokens[k] += one_stream(client, text, new_tokens)["tokens"]
        except Exception as e:  # noqa: BLE001 - reported in the results
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    return {"tokens": sum(tokens), "wall_s": wall, "tokens_per_s": sum(tokens) / wall, "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="generation bundle to serve (default: train one here)")
    ap.add_argument("--size", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--steps", type=int, help="training steps for a bundle trained here (default: per size)")
    ap.add_argument("--workdir", type=Path, help="keep the trained bundle and the server log here")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per reply (fixed length)")
    ap.add_argument("--reps", type=int, default=60, help="single streams per surface in (1)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per surface in (2)")
    ap.add_argument("--per-stream", type=int, default=2, help="replies per stream per round in (2)")
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams in (2)")
    ap.add_argument("--torch-threads", type=int, default=1, help="server torch threads (see serving_bench.py)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--http-client", choices=["raw", "httpx"], default="raw",
                    help="HTTP client: http.client SSE reader (default) or HttpChatClient (httpx)")
    add_output_options(ap, "http_vs_grpc[-<size>].json")
    args = ap.parse_args()
    suffix = "" if args.bundle or args.size == "tiny" else f"-{args.size}"
    args.out = output_path(args, f"http_vs_grpc{suffix}.json")

    import grpc

    from chatforge.client import ChatbotClient
    from chatforge.client.http import HttpChatClient
    from chatforge.client.loadtest import load_texts

    load_start = os.getloadavg()
    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="http-vs-grpc-")) if own_tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        gen = args.bundle or train_bundle(workdir, "generation", args.size, args.steps)
        texts = [t for t in load_texts() if 2 <= len(t) <= 60][:200]
        server = Server(gen, workdir, args.torch_threads, args.precision)
        try:
            with ChatbotClient(server.grpc_target, timeout=300) as g, \
                    HttpChatClient(server.http_target, timeout=300) as h:
                h.wait_for_ready(30)
                clients = {"grpc": g, "http": RawSseClient(server.http_target) if args.http_client == "raw" else h}
                print(f"(1) one stream at a time, interleaved: gRPC {server.grpc_target}, HTTP {server.http_target}",
                      flush=True)
                single = single_streams(clients, texts, args.reps, args.new_tokens)
                print(f"(2) {args.streams} concurrent streams, rounds alternating ...", flush=True)
                rounds: dict[str, list[dict]] = {"grpc": [], "http": []}
                for r in range(args.rounds):
                    for name in ("grpc", "http") if r % 2 == 0 else ("http", "grpc"):
                        rounds[name].append(concurrent_round(clients[name], texts, args.streams, args.per_stream,
                                                             args.new_tokens, offset=r * 17))
        finally:
            server.stop()
        load_end = os.getloadavg()
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)

    med = statistics.median
    paired = [(h["ttft"] - g["ttft"]) * 1e3 for g, h in zip(single["grpc"], single["http"], strict=True)]
    ttft = {name: med([s["ttft"] for s in runs]) * 1e3 for name, runs in single.items()}
    rate = {name: med([s["rate"] for s in runs if s["rate"]]) for name, runs in single.items()}
    agg = {name: med([r["tokens_per_s"] for r in rs]) for name, rs in rounds.items()}
    errors = [e for rs in rounds.values() for r in rs for e in r["errors"]]
    summary = {
        "ttft_overhead_ms": med(paired),
        "single_stream_rate_ratio": rate["http"] / rate["grpc"],
        "concurrent_tokens_ratio": agg["http"] / agg["grpc"],
    }
    passed = {k: (summary[k] <= lim if op == "<=" else summary[k] >= lim) for k, (op, lim) in TARGETS.items()}
    cpu = lscpu()
    print(f"\nHTTP vs gRPC on one server: {cpu.get('Model name', platform.processor())}, {os.cpu_count()} CPUs; "
          f"load average {load_start[0]:.1f} -> {load_end[0]:.1f}; HTTP client: {args.http_client}")
    print(f"TTFT ms (median)         gRPC {ttft['grpc']:7.2f}  HTTP {ttft['http']:7.2f}  paired overhead "
          f"{summary['ttft_overhead_ms']:+.2f} ms (target <= 2): {'yes' if passed['ttft_overhead_ms'] else 'NO'}")
    print(f"1-stream tokens/s        gRPC {rate['grpc']:7.1f}  HTTP {rate['http']:7.1f}  ratio "
          f"{summary['single_stream_rate_ratio']:.3f}")
    print(f"{args.streams}-stream tokens/s        gRPC {agg['grpc']:7.1f}  HTTP {agg['http']:7.1f}  ratio "
          f"{summary['concurrent_tokens_ratio']:.3f} (target >= 0.9): "
          f"{'yes' if passed['concurrent_tokens_ratio'] else 'NO'}")
    if errors:
        print(f"errors: {errors[:5]}")

    result = {
        "benchmark": "http_vs_grpc",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_model": cpu.get("Model name"), "lscpu": cpu, "cpu_count": os.cpu_count(),
                    "threads_per_core": cpu.get("Thread(s) per core"), "platform": platform.platform(),
                    "python": platform.python_version(), "grpcio": grpc.__version__,
                    "loadavg_start": load_start, "loadavg_end": load_end},
        "settings": {"size": None if args.bundle else args.size,
                     "bundle": str(args.bundle) if args.bundle else _describe(args.size, args.steps, "generation"),
                     "new_tokens": args.new_tokens, "reps": args.reps, "rounds": args.rounds,
                     "per_stream": args.per_stream, "streams": args.streams, "torch_threads": args.torch_threads,
                     "precision": args.precision, "http_client": args.http_client,
                     "grpc_client": "ChatbotClient (grpcio C core)"},
        "summary": summary,
        "targets": {k: f"{op} {lim}" for k, (op, lim) in TARGETS.items()},
        "passed": passed,
        "single": {"ttft_ms_median": ttft, "tokens_per_s_median": rate, "ttft_paired_ms": paired},
        "concurrent": {"tokens_per_s_median": agg, "rounds": rounds},
        "errors": errors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)  # atomic: a reader never sees half a results file
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
