"""The learned ranker's served ``select``, against its earlier form in the same run: time per message, same answers.

``select`` re-ranks a shortlist of pool answers (``ResponseSelector._shortlist``) with ``ranker.pair_features``.
Its candidates are all pool answers, so their TF-IDF rows and their nearest pool answers (the reverse-neighbour
feature) are the index's own: ``FeatureIndex.reverse_neighbours`` keeps them, and ``question_vecs_t``/``pool_vecs_t``
keep the transposed TF-IDF matrices that scipy otherwise rebuilt from a CSC view on every product. The reference
here is the earlier computation, run from the same process on the same bundle and shortlists: candidates vectorised
again, a (candidates x pool) partition per space, and the CSC views (``x @ vecs.T``) scipy converts on each call.
Both score each message alone (as a served message is), interleaved message by message; the script checks the two
give the same scores and reports the median time per message and the ratio.

    python benchmarks/ranker_select.py --bundle runs/ranker/bundle --publish
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _output import add_output_options, output_path, write_result


class _EarlierIndex:
    """A view of a FeatureIndex whose transposes are the CSC views scipy converts on every product (the earlier
    code's ``x @ vecs.T``)."""

    def __init__(self, index) -> None:
        self._index = index
        self.question_vecs_t = {s: v.T for s, v in index.question_vecs.items()}
        self.pool_vecs_t = {s: v.T for s, v in index.pool_vecs.items()}

    def __getattr__(self, name):
        return getattr(self._index, name)


def run(args: argparse.Namespace) -> dict:
    from chatforge.bench.machine import cpu_info, lscpu_model
    from chatforge.bundle import load_bundle
    from chatforge.evaluation.evaluate import select_examples

    load_start = os.getloadavg()
    bundle = load_bundle(args.bundle)
    sel = bundle.model
    if getattr(sel.config, "encoder", None) != "ranker":
        raise SystemExit(f"{args.bundle}: not a learned-ranker selection bundle (model.encoder: ranker)")
    from chatforge.baselines.retrieval.ranker import pair_features

    cfg, index = sel.config, sel._index
    earlier = _EarlierIndex(index)
    t0 = time.perf_counter()
    sel.warm()
    warm_s = time.perf_counter() - t0
    questions = [e.text for e in select_examples(bundle.config, None, split=args.split)[0]][:args.messages]

    def features(ix, q, cands, reuse):
        return pair_features(ix, [q], [cands], cfg.ranker_neighbours, cfg.ranker_reverse, cfg.neighbour_temperature,
                             reuse_pool=reuse)

    now_s, before_s, max_diff, same_top = [], [], 0.0, 0
    for _ in range(args.rounds):
        for q in questions:
            cands = sel._shortlist([q], max(cfg.ranker_shortlist, 1))[0]
            t0 = time.perf_counter()
            x_now = features(index, q, cands, True)
            t1 = time.perf_counter()
            x_before = features(earlier, q, cands, False)
            t2 = time.perf_counter()
            now_s.append(t1 - t0)
            before_s.append(t2 - t1)
            s_now, s_before = sel._ranker.predict(x_now), sel._ranker.predict(x_before)
            max_diff = max(max_diff, float(np.abs(x_now - x_before).max()))
            same_top += int(np.argmax(s_now) == np.argmax(s_before))
    # the whole served call, once per message (shortlist + features + trees), for scale
    t0 = time.perf_counter()
    for q in questions:
        sel.select([q])
    select_ms = (time.perf_counter() - t0) / len(questions) * 1000.0
    now_ms, before_ms = statistics.median(now_s) * 1000.0, statistics.median(before_s) * 1000.0
    return {
        "benchmark": "ranker_select",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"lscpu_model": lscpu_model(), "cpu": cpu_info(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()},
        "bundle": str(args.bundle), "split": args.split, "messages": len(questions), "rounds": args.rounds,
        "pool": len(sel.pool), "shortlist": cfg.ranker_shortlist,
        "features_ms": {"now": now_ms, "earlier": before_ms}, "speedup": before_ms / now_ms,
        "select_ms_now": select_ms, "warm_s": warm_s,
        "max_abs_feature_difference": max_diff, "same_top_answer": same_top / len(now_s),
    }


def markdown(r: dict) -> str:
    m = r["machine"]
    return "\n".join([
        "# The learned ranker's select: pool rows reused against the earlier computation", "",
        f"{r['messages']} {r['split']} questions x {r['rounds']} rounds, one message per call, interleaved; pool "
        f"{r['pool']:,} answers, shortlist {r['shortlist']} per space and signal.", "",
        "| features of one message's shortlist | median ms |", "| --- | --- |",
        f"| earlier (candidates vectorised again, partition per message, CSC products) | {r['features_ms']['earlier']:.2f} |",
        f"| now (the index's rows, reverse neighbours kept, CSR transposes) | {r['features_ms']['now']:.2f} |", "",
        f"Speed-up {r['speedup']:.2f}x; largest feature difference {r['max_abs_feature_difference']:.3g}, same top "
        f"answer on {r['same_top_answer']:.1%} of messages. A whole served select now takes {r['select_ms_now']:.1f} "
        f"ms a message; building the reverse-neighbour tables once at load took {r['warm_s']:.2f} s.", "",
        f"Machine: {m['lscpu_model']} (lscpu), {m['cpu'].get('available_cpus')} CPUs; load "
        f"{[round(x, 2) for x in m['loadavg_start']]} -> {[round(x, 2) for x in m['loadavg_end']]}; {r['created']}.", ""])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a learned-ranker selection bundle")
    ap.add_argument("--split", default="test")
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    add_output_options(ap, "ranker-select.json")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    out = output_path(args, "ranker-select.json")
    result = run(args)
    write_result(out, result)
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
