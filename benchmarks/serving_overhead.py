"""The serving layer's own cost per reply and per streamed token: ``chatforge serve``'s server with a model that costs
nothing (issue 16's served path).

A server process wired as ``run_server`` wires it (metrics, alerts, conversation store, the background log writer,
JSON logs) hosts one generator whose decoding costs no CPU: a step model in the continuous batcher whose next token
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

    python benchmarks/serving_overhead.py [--step-ms 0.3] [--tokens 40] [--replies 200] [--rounds 3]
        [--out PATH | --publish]

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


def measure(tokens: int = 40, replies: int = 200, rounds: int = 3, step_ms: float = 0.3) -> dict:
    import psutil

    from chatforge.client import ChatbotClient

    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        env = {**os.environ, "CHATFORGE_ENV": "test", "CHATFORGE_LOG_FORMAT": "json"}
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file), "--step-ms", str(step_ms)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not (port_file.is_file() and port_file.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the zero-model server did not start")
                time.sleep(0.05)  # polling the port file the server writes once serving; bounded
            server = psutil.Process(proc.pid)
            per: dict[int, list[dict]] = {1: [], tokens: []}
            with ChatbotClient(f"127.0.0.1:{port_file.read_text().strip()}", timeout=30) as client:
                _replies(client, tokens, 20, server)  # warm-up, not kept
                for r in range(rounds):
                    for n in ((1, tokens) if r % 2 == 0 else (tokens, 1)):
                        per[n].append(_replies(client, n, replies, server))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    med = {n: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for n, runs in per.items()}
    extra = tokens - 1
    per_token = {k: (med[tokens][k] - med[1][k]) / extra * 1e3 for k in ("wall_ms", "server_cpu_ms", "client_cpu_ms")}
    return {"one_token_reply": med[1], f"{tokens}_token_reply": med[tokens],
            "per_extra_token_us": {k.replace("_ms", "_us"): v for k, v in per_token.items()},
            "one_stream_tokens_per_s_ceiling": tokens / (med[tokens]["wall_ms"] / 1e3),
            "rounds": {str(n): runs for n, runs in per.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # the server process
    ap.add_argument("--step-ms", type=float, default=0.3, help="each prefill and step waits this long, GIL released")
    ap.add_argument("--tokens", type=int, default=40, help="tokens of the long reply (>= 2)")
    ap.add_argument("--replies", type=int, default=200, help="replies per length per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median kept)")
    add_output_options(ap, "serving-overhead.json")
    args = ap.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.step_ms / 1e3)
        return
    if args.tokens < 2 or args.replies < 1 or args.rounds < 1 or args.step_ms < 0:
        ap.error("--tokens must be >= 2, --replies and --rounds >= 1, --step-ms >= 0")
    from chatforge.runtime import cpu_info

    out = output_path(args, "serving-overhead.json")
    load_start = os.getloadavg()
    figures = measure(args.tokens, args.replies, args.rounds, args.step_ms)
    result = {
        "benchmark": "serving_overhead",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "cpu": cpu_info()},
        "settings": {"tokens": args.tokens, "replies": args.replies, "rounds": args.rounds, "step_ms": args.step_ms},
        **figures,
    }
    one, long_, tok = figures["one_token_reply"], figures[f"{args.tokens}_token_reply"], figures["per_extra_token_us"]
    print(f"1-token reply: {one['wall_ms']:.2f} ms wall (first token {one['ttft_ms']:.2f} ms), server CPU "
          f"{one['server_cpu_ms']:.2f} ms, client CPU {one['client_cpu_ms']:.2f} ms")
    print(f"{args.tokens}-token reply: {long_['wall_ms']:.2f} ms wall, server CPU {long_['server_cpu_ms']:.2f} ms")
    print(f"per extra token: {tok['wall_us']:.0f} us wall, server CPU {tok['server_cpu_us']:.0f} us, client CPU "
          f"{tok['client_cpu_us']:.0f} us; one stream at most {figures['one_stream_tokens_per_s_ceiling']:.0f} tokens/s")
    write_result(out, result)


if __name__ == "__main__":
    main()
