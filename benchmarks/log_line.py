"""The cost of one access log line (the line every served call writes), with and without ``mask_secrets``'s
pre-check (``chatforge.serving.observability``; issue 16's served path).

The access log line of ``serving/interceptors.py`` (rpc, code, latency, request id, session id, model) goes through
chatforge's own handler stack as ``chatforge serve`` installs it (``configure_logging``: the secret-masking filter and
the JSON formatter), into memory so the terminal's speed does not count. Two ways, interleaved rounds in one
process: ``pre-check`` (the shipped ``mask_secrets``: one search for a credential's key word, the three masking
substitutions only on a hit) and ``always`` (``mask_secrets_always``, the three substitutions on every string, as
before). Both give the same line (checked). Reported: microseconds per line, best of ``rounds``, and the ratio.

    python benchmarks/log_line.py [--lines 5000] [--rounds 5] [--out benchmarks/results/log-line.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

WAYS = ("pre-check", "always")


def _line(log: logging.Logger) -> None:
    log.log(logging.INFO, "rpc %s %s %.1fms", "/chatforge.v1.Chatbot/Classify", "OK", 4.321,
            extra={"rpc": "/chatforge.v1.Chatbot/Classify", "grpc_code": "OK", "latency_ms": 4.321,
                   "request_id": "3f2a9c1e-5b7d-4e8a-9c1f-2b3d4e5f6a7b", "session_id": "web-8c1d", "model": "intents"})


def measure(lines: int = 5000, rounds: int = 5) -> dict[str, Any]:
    from chatforge.serving import observability

    log = logging.getLogger("chatforge.bench.log_line")
    log.propagate = False
    log.setLevel(logging.INFO)
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)  # configure_logging's stack (formatter + masking filter), into memory
    handler.setFormatter(observability.JsonFormatter())
    handler.addFilter(observability.SecretMaskingFilter())
    log.addHandler(handler)
    shipped, always = observability.mask_secrets, observability.mask_secrets_always
    best = {w: float("inf") for w in WAYS}
    outputs: dict[str, str] = {}
    try:
        for r in range(rounds + 1):  # round 0: warm-up, not kept
            for way in (WAYS if r % 2 else WAYS[::-1]):
                observability.mask_secrets = shipped if way == "pre-check" else always
                sink.seek(0)
                sink.truncate()
                start = time.perf_counter()
                for _ in range(lines):
                    _line(log)
                took = (time.perf_counter() - start) / lines * 1e6
                outputs[way] = json.loads(sink.getvalue().splitlines()[-1])
                if r:
                    best[way] = min(best[way], took)
    finally:
        observability.mask_secrets = shipped
        log.removeHandler(handler)
    same = {k: v for k, v in outputs["pre-check"].items() if k != "time"} == \
        {k: v for k, v in outputs["always"].items() if k != "time"}
    return {"us_per_line": {w: round(best[w], 2) for w in WAYS},
            "ratio_always_over_pre_check": round(best["always"] / best["pre-check"], 3),
            "same_line": same, "lines": lines, "rounds": rounds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from chatforge.bench.machine import cpu_info, load_average, lscpu_model

    load_before = load_average()
    result = measure(args.lines, args.rounds)
    result = {"created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "machine": {"lscpu_model": lscpu_model(), "cpu": cpu_info(), "load_before": load_before,
                          "load_after": load_average(), "python": sys.version.split()[0]},
              **result}
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
