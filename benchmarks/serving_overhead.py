"""The serving layer's own cost per reply and per streamed token: ``chatforge serve``'s server with a model that costs
nothing (issue 16's served path).

A server process wired as ``run_server`` wires it (metrics, alerts, the conversation store on a SQLite file, the
background log writer, JSON logs) hosts one generator whose decoding costs no CPU: a step model in the continuous batcher whose next token
is the last one plus one, never ``</s>``, computed from a (rows, 64) zero tensor, and whose prefill and steps each
wait ``--step-ms`` with the GIL released (``time.sleep``), as a real model's native kernels do (0.3 ms: the demo
bot's scripted step here; 0: a model that takes no time, which leaves the scheduler thread and the event loop
fighting for the GIL and overstates the cost). One client process
(``ChatbotClient``, the library users call) streams replies of 1 token and of ``--tokens`` tokens, one at a time,
alternating in rounds. Reported per reply: wall time, the server's CPU time and the client's (``psutil``), time to
the first token; per extra token: the same, by difference of the two reply lengths. Whatever model is served, one
stream on this machine cannot be faster than this, and a real model's reply costs this beyond its prefill and steps
(served against CTranslate2 called directly, which has no server, this is the part of the gap no model change
closes).

The reference, in the same run: a bare ``grpc.aio`` Chatbot server (chatforge's server options; no interceptor,
metrics, conversation store or log lines) with the same zero-cost model, each reply's prefill and steps in a worker
thread as the batcher runs them, each token handed to the event loop and written as one ``ReplyChunk``: the least a
Python gRPC server streaming a model's tokens does. Rounds alternate between the two servers; the ratios
(chatforge / bare) say how much of the floor is chatforge's own layers and how much is Python gRPC itself.

    python benchmarks/serving_overhead.py [--step-ms 0.3] [--tokens 40] [--replies 200] [--rounds 3]
        [--variant CHATFORGE_STORE_LINGER_MS=0] [--out PATH | --publish]

``--variant VAR=VALUE`` (repeatable) adds a chatforge server with that setting to the same rounds, reported with its
ratios to the default one (``variants``): a setting's cost measured side by side.

Writes JSON (``runs/bench/serving-overhead.json``; ``--publish``: ``benchmarks/results/``) and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _output import add_output_options, output_path, write_result  # noqa: E402

VOCAB = 64


# ------------------------------------------------------------------------------ server side
class _ZeroStep:
    """A continuous-batching step model with no model: next token = last + 1 (mod VOCAB, skipping 0-3), each call
    waiting ``step_s`` with the GIL released."""

    max_len = None

    def __init__(self, step_s: float = 0.0) -> None:
        self.step_s = step_s

    def _wait(self) -> None:
        if self.step_s > 0:
            time.sleep(self.step_s)  # a native kernel's time: no CPU, no GIL (not synchronisation)

    def _logits(self, nxt):
        import torch

        logits = torch.zeros(len(nxt), VOCAB)
        logits[torch.arange(len(nxt)), torch.tensor(nxt)] = 1.0
        return logits

    @staticmethod
    def _next(t: int) -> int:
        return 4 + (t - 3) % (VOCAB - 4)

    def prefill(self, prompts, bos_id):
        self._wait()
        return {"n": len(prompts)}, self._logits([4] * len(prompts))

    def step(self, state, tokens):
        self._wait()
        return self._logits([self._next(t) for t in tokens.tolist()])

    def merge(self, a, b):
        return {"n": a["n"] + b["n"]}

    def select(self, state, index):
        return {"n": len(index)}


class _Detok:
    def feed(self, token_id: int) -> str:
        return f"t{token_id} "


class _ZeroGenerator:
    def __init__(self, step_s: float = 0.0) -> None:
        from chatforge.inference import ModelInfo

        self.step_s = step_s
        self.info = ModelInfo(name="zero", family="none", task="generation", metadata={})
        self.max_input_tokens = 64

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(self, text, options):  # the batcher is used instead (step_spec)
        raise NotImplementedError

    def step_spec(self):
        from chatforge.serving.batching import StepSpec

        return StepSpec(model=_ZeroStep(self.step_s), encode=lambda t: [5] * max(1, len(t.split())), new_detokenizer=_Detok,
                        bos_id=1, eos_id=2, unk_id=3)


def _serve(port_file: str, step_s: float) -> None:
    from chatforge.serving.engine import Engine
    from chatforge.serving.observability import configure_logging
    from chatforge.serving.server import operations, serve
    from chatforge.settings import get_settings

    settings = get_settings()
    [log_writer] = configure_logging(settings, background=True)
    ops = operations(settings)
    ops["metrics"].watch_logs(log_writer)
    engine = Engine({"zero": _ZeroGenerator(step_s)}, {}, metrics=ops["metrics"], max_new_tokens=256)
    try:
        asyncio.run(serve(engine, "127.0.0.1", 0, port_file=port_file, grace=1.0, **ops))
    finally:
        ops["store"].close(timeout=5.0)
        ops["alerts"].close(timeout=5.0)


def _serve_bare(port_file: str, step_s: float) -> None:
    """The reference server (see the module docstring): Reply only, each reply's model work in one worker thread."""
    import grpc
    import torch

    from chatforge.serving.server import SERVER_OPTIONS
    from chatforge.v1 import chatbot_pb2 as pb
    from chatforge.v1 import chatbot_pb2_grpc as pb_grpc

    step = _ZeroStep(step_s)
    detok = _Detok()

    class Bare(pb_grpc.ChatbotServicer):
        async def Reply(self, request, context):
            n = request.options.max_new_tokens
            loop = asyncio.get_running_loop()
            tokens: asyncio.Queue = asyncio.Queue()

            def generate() -> None:  # what the batcher's thread does for one row: prefill, then a step per token
                state, logits = step.prefill([[5] * max(1, len(request.text.split()))], 1)
                for i in range(n):
                    token = int(logits.argmax(-1)[0])
                    loop.call_soon_threadsafe(tokens.put_nowait, token)
                    if i + 1 < n:
                        logits = step.step(state, torch.tensor([token]))
                loop.call_soon_threadsafe(tokens.put_nowait, None)

            work = loop.run_in_executor(None, generate)
            while (token := await tokens.get()) is not None:
                await context.write(pb.ReplyChunk(delta=pb.ReplyDelta(text=detok.feed(token), token_id=token)))
            await work
            await context.write(pb.ReplyChunk(final=pb.ReplyFinal(finish_reason="length", completion_tokens=n,
                                                                  model="zero")))

    async def main() -> None:
        server = grpc.aio.server(options=list(SERVER_OPTIONS))
        pb_grpc.add_ChatbotServicer_to_server(Bare(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(str(port))
        await server.wait_for_termination()

    with torch.inference_mode():
        asyncio.run(main())


SERVERS = {"chatforge": "--serve", "bare": "--serve-bare"}


# ------------------------------------------------------------------------------ client side
def _replies(client, n: int, count: int, server) -> dict:
    import psutil

    me = psutil.Process()
    walls, firsts = [], []
    s0, c0 = server.cpu_times(), me.cpu_times()
    for i in range(count):
        start = time.perf_counter()
        first, got = None, 0
        for chunk in client.reply_stream(f"w {i}", max_new_tokens=n, min_new_tokens=n):
            if not chunk.is_final:
                got += 1
                if first is None:
                    first = time.perf_counter()
        walls.append(time.perf_counter() - start)
        firsts.append(first - start)
        if got != n:
            raise RuntimeError(f"asked for {n} tokens, got {got}")
    s1, c1 = server.cpu_times(), me.cpu_times()
    return {"wall_ms": statistics.median(walls) * 1e3, "ttft_ms": statistics.median(firsts) * 1e3,
            # rounded: the sums of CPU times (10 ms ticks) differ by float noise (-1e-14) when no tick passed
            "server_cpu_ms": round((s1.user + s1.system - s0.user - s0.system) / count * 1e3, 6),
            "client_cpu_ms": round((c1.user + c1.system - c0.user - c0.system) / count * 1e3, 6)}


def _start(kind: str, port_file: Path, step_ms: float, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    # the conversation store on a SQLite file, as `chatforge serve` keeps it (tests' in-memory one costs less a turn)
    env = {**os.environ, "CHATFORGE_ENV": "test", "CHATFORGE_LOG_FORMAT": "json",
           "CHATFORGE_STORE_URL": f"sqlite:///{port_file.parent / f'{port_file.stem}.db'}", **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, __file__, SERVERS[kind.split("[")[0]], str(port_file), "--step-ms",
                             str(step_ms)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (port_file.is_file() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the zero-model {kind} server did not start")
        time.sleep(0.05)  # polling the port file the server writes once serving; bounded
    return proc


def _figures(per: dict[int, list[dict]], tokens: int) -> dict:
    med = {n: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for n, runs in per.items()}
    extra = tokens - 1
    per_token = {k: (med[tokens][k] - med[1][k]) / extra * 1e3 for k in ("wall_ms", "server_cpu_ms", "client_cpu_ms")}
    return {"one_token_reply": med[1], f"{tokens}_token_reply": med[tokens],
            "per_extra_token_us": {k.replace("_ms", "_us"): v for k, v in per_token.items()},
            "one_stream_tokens_per_s_ceiling": tokens / (med[tokens]["wall_ms"] / 1e3),
            "rounds": {str(n): runs for n, runs in per.items()}}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def measure(tokens: int = 40, replies: int = 200, rounds: int = 3, step_ms: float = 0.3,
            variants: dict[str, str] | None = None) -> dict:
    """chatforge's server and the bare reference, rounds alternating between them (and between reply lengths); with
    ``variants`` (variable -> value), one more chatforge server per variable with it set, named
    ``chatforge[VAR=VALUE]``, in the same rounds."""
    import psutil

    from chatforge.client import ChatbotClient

    envs = {"chatforge": None, "bare": None, **{f"chatforge[{k}={v}]": {k: v} for k, v in (variants or {}).items()}}
    per = {kind: {1: [], tokens: []} for kind in envs}
    with tempfile.TemporaryDirectory() as tmp:
        procs: dict[str, subprocess.Popen] = {}
        ports = {kind: Path(tmp) / f"server{i}.port" for i, kind in enumerate(envs)}
        try:
            for kind, env in envs.items():
                procs[kind] = _start(kind, ports[kind], step_ms, env)
            clients = {kind: ChatbotClient(f"127.0.0.1:{ports[kind].read_text().strip()}", timeout=30) for kind in envs}
            try:
                servers = {kind: psutil.Process(p.pid) for kind, p in procs.items()}
                for kind in envs:
                    _replies(clients[kind], tokens, 20, servers[kind])  # warm-up, not kept
                for r in range(rounds):
                    for kind in (list(envs) if r % 2 == 0 else list(envs)[::-1]):
                        for n in ((1, tokens) if r % 2 == 0 else (tokens, 1)):
                            per[kind][n].append(_replies(clients[kind], n, replies, servers[kind]))
            finally:
                for c in clients.values():
                    c.close()
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                p.wait(timeout=60)
    ours, bare = _figures(per["chatforge"], tokens), _figures(per["bare"], tokens)
    out = {**ours, "reference_bare_grpc": bare, "chatforge_over_bare": _ratios(ours, bare, tokens)}
    if variants:
        out["variants"] = {}
        for kind in envs:
            if kind.startswith("chatforge["):
                fig = _figures(per[kind], tokens)
                out["variants"][kind] = {**fig, "over_chatforge": _ratios(fig, ours, tokens)}
    return out


def _ratios(a: dict, b: dict, tokens: int) -> dict:
    long_ = f"{tokens}_token_reply"
    return {"one_token_reply_server_cpu": _ratio(a["one_token_reply"]["server_cpu_ms"], b["one_token_reply"]["server_cpu_ms"]),
            "one_token_reply_wall": _ratio(a["one_token_reply"]["wall_ms"], b["one_token_reply"]["wall_ms"]),
            f"{tokens}_token_reply_wall": _ratio(a[long_]["wall_ms"], b[long_]["wall_ms"]),
            "per_extra_token_server_cpu": _ratio(a["per_extra_token_us"]["server_cpu_us"],
                                                 b["per_extra_token_us"]["server_cpu_us"])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # the server process
    ap.add_argument("--serve-bare", help=argparse.SUPPRESS)  # the reference server process
    ap.add_argument("--step-ms", type=float, default=0.3, help="each prefill and step waits this long, GIL released")
    ap.add_argument("--tokens", type=int, default=40, help="tokens of the long reply (>= 2)")
    ap.add_argument("--replies", type=int, default=200, help="replies per length per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median kept)")
    ap.add_argument("--variant", action="append", default=[], metavar="VAR=VALUE",
                    help="also measure chatforge's server with this environment variable set (repeatable), e.g. "
                         "CHATFORGE_STORE_LINGER_MS=0")
    add_output_options(ap, "serving-overhead.json")
    args = ap.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.step_ms / 1e3)
        return
    if args.serve_bare:
        _serve_bare(args.serve_bare, args.step_ms / 1e3)
        return
    if args.tokens < 2 or args.replies < 1 or args.rounds < 1 or args.step_ms < 0:
        ap.error("--tokens must be >= 2, --replies and --rounds >= 1, --step-ms >= 0")
    variants = {}
    for v in args.variant:
        key, sep, value = v.partition("=")
        if not sep or not key.startswith("CHATFORGE_") or key in variants:
            ap.error(f"--variant {v!r}: allowed: CHATFORGE_<SETTING>=VALUE, each variable once")
        variants[key] = value
    from chatforge.runtime import cpu_info

    out = output_path(args, "serving-overhead.json")
    load_start = os.getloadavg()
    figures = measure(args.tokens, args.replies, args.rounds, args.step_ms, variants)
    result = {
        "benchmark": "serving_overhead",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "cpu": cpu_info()},
        "settings": {"tokens": args.tokens, "replies": args.replies, "rounds": args.rounds, "step_ms": args.step_ms,
                     **({"variants": variants} if variants else {})},
        **figures,
    }
    one, long_, tok = figures["one_token_reply"], figures[f"{args.tokens}_token_reply"], figures["per_extra_token_us"]
    print(f"1-token reply: {one['wall_ms']:.2f} ms wall (first token {one['ttft_ms']:.2f} ms), server CPU "
          f"{one['server_cpu_ms']:.2f} ms, client CPU {one['client_cpu_ms']:.2f} ms")
    print(f"{args.tokens}-token reply: {long_['wall_ms']:.2f} ms wall, server CPU {long_['server_cpu_ms']:.2f} ms")
    print(f"per extra token: {tok['wall_us']:.0f} us wall, server CPU {tok['server_cpu_us']:.0f} us, client CPU "
          f"{tok['client_cpu_us']:.0f} us; one stream at most {figures['one_stream_tokens_per_s_ceiling']:.0f} tokens/s")
    bare, ratio = figures["reference_bare_grpc"], figures["chatforge_over_bare"]
    print(f"bare grpc.aio reference: 1-token reply {bare['one_token_reply']['wall_ms']:.2f} ms wall, server CPU "
          f"{bare['one_token_reply']['server_cpu_ms']:.2f} ms; per extra token server CPU "
          f"{bare['per_extra_token_us']['server_cpu_us']:.0f} us")
    print("chatforge / bare: " + ", ".join(f"{k} {v:.2f}x" if v is not None else f"{k} n/a" for k, v in ratio.items()))
    for name, fig in figures.get("variants", {}).items():
        print(f"{name}: 1-token reply {fig['one_token_reply']['wall_ms']:.2f} ms wall, server CPU "
              f"{fig['one_token_reply']['server_cpu_ms']:.2f} ms; over chatforge: " + ", ".join(
                  f"{k} {v:.2f}x" if v is not None else f"{k} n/a" for k, v in fig["over_chatforge"].items()))
    write_result(out, result)


if __name__ == "__main__":
    main()
