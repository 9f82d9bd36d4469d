"""The reply policy's familiarity guard on held-out messages: how many real questions it refuses, how many foreign ones.

``min_familiarity`` (``chatforge.serving.policy``) sends a message to the fallback reply, as out of scope, when its
familiarity to the retriever's training questions (``chatforge.baselines.retrieval.familiarity``: mean
log-probability per character under a character bigram model of them) falls below it. ``chatforge replies --hybrid``
chooses it as a low quantile of the *validation* questions. This script takes a selection bundle, chooses the guard
the same way, and scores it on what the choice never saw:

- the bundle's **test** questions (in domain: every one the guard refuses is a false fallback);
- **English** utterances (CLINC150's validation split, in-scope and out-of-scope: another language);
- **keyboard mash** (seeded random Latin letters in 1-4 words) and **random Hangul syllables** (seeded, 1-4 words);
- **word salad**: each test question's own characters shuffled (the same alphabet, no Korean word order: the hard
  case for a character model, and not something the guard has to catch).

Beside each share it gives what the selector alone would have done: the share of messages whose best pool answer
clears the retrieval threshold of a policy (``--policy``, e.g. the ``policy.yaml`` of ``chatforge replies``), i.e.
the share the hybrid bot answered from its pool before the guard. It also times the guard against the selector's own
``select`` per message, in the same run (median of single-message calls, interleaved).

    python benchmarks/familiarity_guard.py --bundle runs/ranker/bundle --policy runs/replies/policy.yaml --publish

Writes JSON, a Markdown table and a PNG (the familiarity of each set, with the guard) under ``runs/bench/`` (or
``benchmarks/results/`` with ``--publish``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _output import add_output_options, output_path, write_result

DEFAULT_CLINC = Path("../shared/data/clinc150/data_full_trainval.json")
LATIN = "qwertyuiopasdfghjklzxcvbnm"


def synthetic_sets(test_questions: list[str], n: int, seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)

    def words(make_word) -> str:
        return " ".join(make_word() for _ in range(rng.randint(1, 4)))

    return {
        "keyboard_mash": [words(lambda: "".join(rng.choice(LATIN) for _ in range(rng.randint(2, 6))))
                          for _ in range(n)],
        "random_hangul": [words(lambda: "".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(rng.randint(1, 5))))
                          for _ in range(n)],
        "word_salad": ["".join(rng.sample(q, len(q))) for q in test_questions],
    }


def clinc_english(path: Path, n: int) -> list[str]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    texts = [t for t, _ in doc.get("val", [])] + [t for t, _ in doc.get("oos_val", [])]
    if not texts:
        raise SystemExit(f"{path}: no 'val' or 'oos_val' utterances (a CLINC150 data_full json is expected)")
    return texts[:n]


def time_per_message(selector, texts: list[str], rounds: int) -> dict:
    """Median seconds per single-message call of the guard and of select, interleaved message by message."""
    guard, select = [], []
    for _ in range(rounds):
        for t in texts:
            t0 = time.perf_counter()
            selector.familiarity([t])
            t1 = time.perf_counter()
            selector.select([t])
            t2 = time.perf_counter()
            guard.append(t1 - t0)
            select.append(t2 - t1)
    g, s = statistics.median(guard), statistics.median(select)
    return {"guard_us": g * 1e6, "select_us": s * 1e6, "guard_over_select": g / s, "messages": len(texts),
            "rounds": rounds}


def run(args: argparse.Namespace) -> dict:
    from chatforge.bench.machine import cpu_info, lscpu_model
    from chatforge.bundle import load_bundle
    from chatforge.evaluation.evaluate import select_examples
    from chatforge.evaluation.replies import choose_min_familiarity
    from chatforge.serving.policy import ReplyPolicy

    load_start = os.getloadavg()
    bundle = load_bundle(args.bundle)
    if bundle.task != "selection":
        raise SystemExit(f"{args.bundle}: task {bundle.task!r}; the guard belongs to selection bundles")
    selector = bundle.model
    valid = [e.text for e in select_examples(bundle.config, None, split="valid")[0]]
    test = [e.text for e in select_examples(bundle.config, None, split="test")[0]]
    sets = {"valid": valid, "test": test}
    if args.clinc is not None and args.clinc.is_file():
        sets["english_clinc150"] = clinc_english(args.clinc, args.n_english)
    sets.update(synthetic_sets(test, args.n_synthetic, args.seed))
    threshold = ReplyPolicy.from_yaml(args.policy).retrieval_threshold if args.policy else None
    fam = {k: np.asarray(selector.familiarity(v), dtype=np.float64) for k, v in sets.items()}
    guard = choose_min_familiarity(fam["valid"].tolist(), args.quantile)
    rows = {}
    for name, texts in sets.items():
        f = fam[name]
        row = {"n": len(texts), "fallback_share": float((f < guard).mean()),
               "familiarity_quantiles": {q: float(np.quantile(f, float(q))) for q in ("0.01", "0.05", "0.5", "0.95")}}
        if threshold is not None:
            best = np.asarray([b[0][1] for b in selector.select(texts)])
            row["answered_from_pool_without_guard"] = float((best >= threshold).mean())
            row["answered_from_pool_with_guard"] = float(((best >= threshold) & (f >= guard)).mean())
        rows[name] = row
    order = np.argsort(fam["test"], kind="stable")[:args.examples]
    refused = [{"question": test[i], "familiarity": float(fam["test"][i])} for i in order]
    speed = time_per_message(selector, test[:args.timed], args.rounds)
    return {
        "benchmark": "familiarity_guard",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"lscpu_model": lscpu_model(), "cpu": cpu_info(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()},
        "bundle": str(args.bundle), "encoder": getattr(selector.config, "encoder", ""),
        "data": str(bundle.config.data.path), "quantile": args.quantile, "min_familiarity": guard,
        "chosen_on": "valid", "retrieval_threshold": threshold, "seed": args.seed, "sets": rows,
        "least_familiar_test_questions": refused, "speed": speed,
        "familiarity": {k: v.tolist() for k, v in fam.items()},
    }


def markdown(r: dict) -> str:
    m = r["machine"]
    pool = r["retrieval_threshold"] is not None
    head = "| messages | n | guard refuses | median familiarity |"
    head += " answered from the pool without the guard | with it |" if pool else ""
    lines = [f"# The familiarity guard on held-out messages ({Path(r['data']).name}, {r['encoder']} selector)", "",
             f"min_familiarity {r['min_familiarity']:.3f} = the {r['quantile']:.1%} quantile of the validation "
             f"questions' familiarity" + (f"; retrieval threshold {r['retrieval_threshold']:.4f} (the policy's)"
                                          if pool else "") + ".", "", head,
             "|" + " --- |" * (6 if pool else 4)]
    for name, row in r["sets"].items():
        cells = [name + (" (chosen on)" if name == "valid" else ""), str(row["n"]), f"{row['fallback_share']:.1%}",
                 f"{row['familiarity_quantiles']['0.5']:.2f}"]
        if pool:
            cells += [f"{row['answered_from_pool_without_guard']:.1%}", f"{row['answered_from_pool_with_guard']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    s = r["speed"]
    lines += ["", f"Cost per message (median of {s['rounds']} x {s['messages']} single-message calls, interleaved): "
              f"the guard {s['guard_us']:.1f} us, the selector's select {s['select_us']:.0f} us "
              f"({s['guard_over_select']:.4f}x).", "", "Least familiar test questions (the guard refuses those below "
              f"{r['min_familiarity']:.3f}):", ""]
    lines += [f"- {q['familiarity']:.2f} {q['question']}" for q in r["least_familiar_test_questions"]]
    lines += ["", f"Machine: {m['lscpu_model']} (lscpu), {m['cpu'].get('available_cpus')} CPUs; load "
              f"{[round(x, 2) for x in m['loadavg_start']]} -> {[round(x, 2) for x in m['loadavg_end']]}; "
              f"{r['created']}.", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    values = [v for k, v in r["familiarity"].items()]
    lo = min(min(v) for v in values)
    bins = np.linspace(lo, 0.0, 60)
    for name, v in r["familiarity"].items():
        ax.hist(v, bins=bins, histtype="step", density=True, linewidth=1.5, label=f"{name} ({len(v)})")
    ax.axvline(r["min_familiarity"], color="black", linestyle="--",
               label=f"min_familiarity {r['min_familiarity']:.2f} ({r['quantile']:.0%} of valid)")
    ax.set_xlabel("familiarity: mean log-probability per character under the training questions' model")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    m = r["machine"]
    fig.suptitle(f"The familiarity guard on held-out messages ({r['encoder']} selector); {m['lscpu_model']}, "
                 f"load {[round(x, 2) for x in m['loadavg_start']]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a selection bundle (model.family: retrieval)")
    ap.add_argument("--policy", type=Path, default=None,
                    help="a reply policy whose retrieval_threshold says what the pool would have answered")
    ap.add_argument("--quantile", type=float, default=0.01, help="the guard: this quantile of valid (default 0.01)")
    ap.add_argument("--clinc", type=Path, default=DEFAULT_CLINC, help="CLINC150 data_full json (English messages)")
    ap.add_argument("--n-english", type=int, default=500)
    ap.add_argument("--n-synthetic", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=10, help="least familiar test questions listed")
    ap.add_argument("--timed", type=int, default=100, help="test questions timed per round")
    ap.add_argument("--rounds", type=int, default=3)
    add_output_options(ap, "familiarity-guard.json")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    out = output_path(args, "familiarity-guard.json")
    result = run(args)
    write_result(out, result)
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    plot(result, out.with_suffix(".png"))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
