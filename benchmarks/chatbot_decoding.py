"""Decoding settings of a chit-chat generator, chosen on validation and reported on test (issue 17).

Every setting of a small grid (greedy; CTRL's repetition penalty; no repeated n-grams; nucleus sampling
with a fixed seed) answers the validation questions of the bundle's own split; the one with the best chrF
(ties: the higher distinct-2) is chosen there, and only then are it and greedy decoding scored on the
test split, so the test figures are not fitted. Writes ``decoding.json`` and ``decoding.md`` under ``--out``.

    python benchmarks/chatbot_decoding.py runs/transformer/bundle --out runs/decoding
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

from chatforge.bundle import load_bundle
from chatforge.evaluation.evaluate import select_examples
from chatforge.evaluation.metrics import generation_quality
from chatforge.evaluation.replies import bundle_replies
from chatforge.fileio import atomic_write_json, atomic_write_text

GRID: dict[str, dict] = {
    "greedy": {},
    "repetition_penalty=1.2": {"repetition_penalty": 1.2},
    "repetition_penalty=1.5": {"repetition_penalty": 1.5},
    "no_repeat_ngram_size=2": {"no_repeat_ngram_size": 2},
    "no_repeat_ngram_size=3": {"no_repeat_ngram_size": 3},
    "no_repeat_ngram_size=3, repetition_penalty=1.2": {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2},
    "top_p=0.9, temperature=0.7": {"do_sample": True, "top_p": 0.9, "temperature": 0.7, "seed": 0},
}
COLUMNS = ("chrf", "bleu", "distinct_1", "distinct_2", "avg_length", "repeat_3_rate", "identical_rate")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _score(bundle, split: str, settings: dict, max_examples: int | None) -> dict:
    examples, _, _ = select_examples(bundle.config, None, split=split)
    examples = [e for e in examples if e.response][:max_examples]
    questions, refs = [e.text for e in examples], [e.response for e in examples]
    t0 = time.perf_counter()
    replies = bundle_replies(bundle, questions, decoding=settings).texts
    return {"n": len(questions), "seconds": round(time.perf_counter() - t0, 1),
            **generation_quality(questions, replies, refs), "examples": list(zip(questions[:5], replies[:5],
                                                                                 strict=True))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="a generation bundle")
    ap.add_argument("--out", type=Path, default=Path("runs/decoding"))
    ap.add_argument("--max-examples", type=int, default=None, help="at most this many questions per split")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bundle = load_bundle(args.bundle)
    if bundle.task not in ("generation", "lm"):
        raise SystemExit(f"{args.bundle} is a {bundle.task!r} bundle; this script tunes generation bundles")
    valid = {}
    for name, settings in GRID.items():
        valid[name] = _score(bundle, "valid", settings, args.max_examples)
        logging.info("valid %-45s chrF %.2f distinct-2 %.3f", name, valid[name]["chrf"], valid[name]["distinct_2"])
    chosen = max(valid, key=lambda k: (valid[k]["chrf"], valid[k]["distinct_2"]))
    test = {name: _score(bundle, "test", GRID[name], args.max_examples) for name in dict.fromkeys(["greedy", chosen])}
    result = {"bundle": str(args.bundle), "family": bundle.family, "chosen_on_valid": chosen,
              "settings": GRID[chosen], "valid": valid, "test": test,
              "machine": {"cpu": _cpu_model(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "decoding.json", result)
    rows = ["| split | setting | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 2)]
    for split, figures in (("valid", valid), ("test", test)):
        for name, fig in figures.items():
            mark = " (chosen)" if name == chosen else ""
            rows.append(f"| {split} | {name}{mark} | " + " | ".join(f"{fig[c]:.3f}" for c in COLUMNS) + " |")
    atomic_write_text(args.out / "decoding.md", "\n".join(rows) + "\n")
    print("\n".join(rows))  # noqa: T201 - a benchmark script's report
    print(f"chosen on valid: {chosen}; written to {args.out}")  # noqa: T201


if __name__ == "__main__":
    main()
