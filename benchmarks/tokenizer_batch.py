"""SentencePiece batch encoding: its list form (a thread pool started per call) against one call per text,
at the list sizes chatforge encodes -- one text per Classify/Reply call, a micro-batch of 8-64 texts, training
corpora of thousands -- so ``Tokenizer.encode_batch`` can pick per size (``THREADED_BATCH_MIN``).

Texts: ChatbotData questions (``../shared/data/chatbot_kr/ChatbotData.csv``) with a tokenizer trained on them
(vocabulary 4000, unigram, as ``configs/chatbot_kr_transformer.yaml``). Both ways are timed interleaved,
``--reps`` rounds after a warm-up, and the median per call is reported with the ratio (per text / list
form; > 1: one call per text is faster), the CPU model, the CPUs available and the load average.

    python benchmarks/tokenizer_batch.py [--sizes 1 8 32 256 1024 8192] [--reps 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "chatbot_kr" / "ChatbotData.csv"


def texts_and_tokenizer(n_train: int = 5000):
    import csv

    from chatforge.tokenizer import Tokenizer

    with DATA.open(encoding="utf-8") as f:
        texts = [row["Q"] for row in csv.DictReader(f)]
    return texts, Tokenizer.train(texts[:n_train], vocab_size=4000, model_type="unigram", on_vocab_too_large="lower")


def time_call(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def measure(sp, texts: list[str], sizes: list[int], rounds: int) -> list[dict]:
    out = []
    for n in sizes:
        batch = (texts * (n // len(texts) + 1))[:n]
        ways = {"list form": lambda b=batch: sp.encode(b, out_type=int),
                "one call per text": lambda b=batch: [sp.encode(t, out_type=int) for t in b]}
        assert ways["list form"]() == ways["one call per text"]()  # the same ids either way
        inner = max(1, 2000 // n)  # calls per timing, so a timing lasts long enough to read
        for fn in ways.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(rounds):
            for k, fn in ways.items():
                times[k].append(time_call(fn, inner))
        med = {k: statistics.median(v) for k, v in times.items()}
        out.append({"texts": n, "us_per_call": {k: round(1e6 * v, 2) for k, v in med.items()},
                    "ratio_per_text_over_list": round(med["list form"] / med["one call per text"], 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32, 256, 1024, 8192])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "tokenizer-batch.json")
    args = ap.parse_args()
    from chatforge.runtime import cpu_info

    texts, tok = texts_and_tokenizer()
    before = cpu_info()
    rows = measure(tok.sp, texts, args.sizes, args.reps)
    result = {"benchmark": "tokenizer_batch", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine_before": before, "load_after": list(os.getloadavg()), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"CPU {before['model_name']}, {before['available_cpus']} CPUs, load {before['load_average']}")
    for r in rows:
        print(f"{r['texts']:6d} texts: list form {r['us_per_call']['list form']:10.1f} us, one call per text "
              f"{r['us_per_call']['one call per text']:10.1f} us, ratio {r['ratio_per_text_over_list']:.2f}x")


if __name__ == "__main__":
    main()
