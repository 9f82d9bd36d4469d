"""Speculative decoding's draft settings chosen on validation questions, reported on test ones.

The drafts (``chatforge.drafts.DraftIndex``: the training replies in a trie, read ahead of a greedy reply) have two
settings: ``min_probability`` (a draft stops where its estimated probability falls under it; ``DraftIndex``'s
default) and the most draft tokens a lone stream gets per step (``serve --draft-tokens``). Greedy replies are the
same whatever they are, so the choice changes only how many decoding steps a reply takes and how wide each one is.

This script counts that offline, exactly as ``ContinuousBatcher`` drafts for one stream: the bundle's fp32 greedy
reply to each question (the model run once), then for every setting the steps the batcher would take (a step feeds
the row's last token and its draft; the longest prefix of the draft that the reply continues with, plus the model's
own next token, is emitted). A step's cost grows with the tokens it feeds, so each setting's time is estimated with
a cost per step and per fed token, measured here on the bundle's own step model (median of interleaved repetitions,
least squares over widths 1-9; ``--step-ms``/``--token-ms`` give them instead). The setting with the least
estimated time on the **validation** split of the bundle's config is the choice; the **test** split is then scored
with every setting, so the figure reported for the chosen one was not fitted on it.

    python benchmarks/draft_settings.py --bundle RUN/bundle [--out FILE.json | --publish]

Writes JSON (``runs/bench/draft-settings.json`` unless ``--out``/``--publish``) with the machine (``lscpu`` model,
load) beside the measured step costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import add_output_options, output_path  # noqa: E402

MIN_PROBABILITIES = (0.05, 0.1, 0.2, 0.3, 0.5)
DRAFT_TOKENS = (1, 2, 3, 4, 6, 8)
SHIPPED = (0.2, 4)  # DraftIndex's min_probability default, serve's --draft-tokens default for fp32/bf16


def replay(reply: list[int], index, k: int, cap: int, min_new: int = 0) -> tuple[int, int]:
    """(steps after the prefill, tokens fed in them) for one greedy ``reply`` (its token ids, ``</s>`` last when it
    ended there) decoded alone with ``k`` draft tokens, as ``ContinuousBatcher._decode_step`` does; ``cap`` is the
    reply's token limit (``max_steps``), ``min_new`` its ``min_new_tokens`` (no drafts before them)."""
    if not reply:
        return 0, 0
    node = index.advance(0, reply[0])  # the prefill chose the first token
    tail: tuple[int, ...] = (reply[0],)
    i, steps, fed = 1, 0, 0
    while i < len(reply):  # the row goes on: its last token was not </s> and it has room
        d = index.draft(node, min(k, cap - i - 1), tail) if k and i >= min_new else []
        a = 0
        while a < len(d) and i + a < len(reply) and d[a] == reply[i + a]:
            a += 1
        out = reply[i:i + a + 1]
        steps += 1
        fed += 1 + len(d)
        for tok in out:
            node = index.advance(node, tok)
            tail = (*tail[1 - index.CONTEXT:], tok)
        i += len(out)
    return steps, fed


def greedy_replies(model, examples, max_new: int) -> list[list[int]]:
    from chatforge.decoding import GenerationOptions

    opts = GenerationOptions(max_new_tokens=max_new)
    out = []
    for ex in examples:
        ids = [d.token_id for d in model.stream(ex.text, opts)]
        if len(ids) < max_new:
            ids.append(model.tok.eos_id)  # it ended at </s>, which the batcher also emits (and then stops)
        out.append(ids)
    return out


def step_costs(model, prompts: list[list[int]], widths=(1, 2, 3, 5, 9), reps: int = 25) -> dict:
    """Milliseconds of one verification step feeding ``w`` tokens per width (a lone row, after its prefill),
    medians of interleaved repetitions, and a least-squares line ``step_ms + token_ms * w``."""
    import torch

    sm = model.step_spec().model
    times: dict[int, list[float]] = {w: [] for w in widths}
    bos = model.tok.bos_id
    for r in range(reps):
        for w in widths:
            prompt = prompts[r % len(prompts)]
            state, logits = sm.prefill([prompt], bos)
            fed = torch.full((1, w), int(logits.argmax(-1)), dtype=torch.long)
            t0 = time.perf_counter()
            sm.verify(state, fed)
            times[w].append((time.perf_counter() - t0) * 1000)
    med = {w: statistics.median(v[2:]) for w, v in times.items()}  # the first rounds warm up
    xs, ys = list(med), list(med.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    token_ms = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return {"median_ms_by_width": med, "step_ms": my - token_ms * mx, "token_ms": token_ms}


def score(replies: list[list[int]], replies_index, cap: int, step_ms: float, token_ms: float) -> list[dict]:
    from chatforge.drafts import DraftIndex

    rows = []
    for p in MIN_PROBABILITIES:
        index = DraftIndex(replies_index.replies, replies_index.eos_id, min_probability=p)
        for k in (0, *DRAFT_TOKENS):
            steps = fed = 0
            for reply in replies:
                s, f = replay(reply, index, k, cap)
                steps, fed = steps + s, fed + f
            rows.append({"min_probability": p, "draft_tokens": k, "steps": steps, "fed_tokens": fed,
                         "estimated_ms": steps * step_ms + fed * token_ms})
            if k == 0:
                rows[-1]["min_probability"] = None  # no drafts: the probability does not matter
    seen, out = set(), []
    for r in rows:  # one no-draft row
        key = (r["min_probability"], r["draft_tokens"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    base = next(r for r in out if r["draft_tokens"] == 0)
    for r in out:
        r["steps_vs_no_drafts"] = r["steps"] / base["steps"] if base["steps"] else None
        r["estimated_speedup"] = base["estimated_ms"] / r["estimated_ms"] if r["estimated_ms"] else None
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a trained generation bundle with drafts/")
    ap.add_argument("--max-examples", type=int, default=None, help="first N questions of each split (a quick run)")
    ap.add_argument("--step-ms", type=float, default=None, help="cost of a step (ms), instead of measuring it")
    ap.add_argument("--token-ms", type=float, default=None, help="cost of each fed token (ms), with --step-ms")
    ap.add_argument("--threads", type=int, default=2)
    add_output_options(ap, "draft-settings.json")
    args = ap.parse_args(argv)
    if (args.step_ms is None) != (args.token_ms is None):
        ap.error("--step-ms and --token-ms go together")

    import torch

    from chatforge.runtime import cpu_info

    torch.set_num_threads(args.threads)
    from chatforge.inference import load_model
    from chatforge.training.run import load_splits

    model = load_model(args.bundle, "chat", precision="fp32")
    index = model.bundle.drafts
    if index is None:
        raise SystemExit(f"{args.bundle} has no drafts/ (chatforge bundle add-drafts {args.bundle})")
    cfg = model.bundle.config
    _, valid, test, path = load_splits(cfg)
    if args.max_examples:
        valid, test = valid[:args.max_examples], test[:args.max_examples]
    if not valid or not test:
        raise SystemExit(f"{args.bundle}: its config holds out no validation or test split")
    load_before = os.getloadavg()
    cap = cfg.train.max_target_len
    replies = {name: greedy_replies(model, split, cap) for name, split in (("valid", valid), ("test", test))}
    if args.step_ms is None:
        prompts = [model.tok.encode(ex.text) for ex in valid[:16]]
        costs = step_costs(model, prompts)
    else:
        costs = {"step_ms": args.step_ms, "token_ms": args.token_ms, "given": True}
    result: dict = {"bundle": str(args.bundle), "data": str(path), "cpu": cpu_info(),
                    "load_before": load_before, "costs": costs, "splits": {}}
    for name, reps in replies.items():
        result["splits"][name] = {"questions": len(reps), "tokens": sum(len(r) for r in reps),
                                  "settings": score(reps, index, cap, costs["step_ms"], costs["token_ms"])}
    result["load_after"] = os.getloadavg()
    valid_rows = [r for r in result["splits"]["valid"]["settings"] if r["draft_tokens"]]
    best = min(valid_rows, key=lambda r: r["estimated_ms"])
    chosen = (best["min_probability"], best["draft_tokens"])

    def on_test(key):
        return next(r for r in result["splits"]["test"]["settings"]
                    if (r["min_probability"], r["draft_tokens"]) == key)

    result["chosen_on_valid"] = {"min_probability": chosen[0], "draft_tokens": chosen[1],
                                 "valid": best, "test": on_test(chosen)}
    result["shipped"] = {"min_probability": SHIPPED[0], "draft_tokens": SHIPPED[1], "test": on_test(SHIPPED),
                         "valid": next(r for r in valid_rows if (r["min_probability"], r["draft_tokens"]) == SHIPPED)}
    out = output_path(args, "draft-settings.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    c, s = result["chosen_on_valid"], result["shipped"]
    print(f"step {costs['step_ms']:.2f} ms + {costs['token_ms']:.3f} ms per fed token")
    print(f"chosen on valid: min_probability {c['min_probability']}, {c['draft_tokens']} tokens -> valid "
          f"{c['valid']['estimated_speedup']:.2f}x, test {c['test']['estimated_speedup']:.2f}x "
          f"(steps {c['test']['steps_vs_no_drafts']:.2f} of no drafts)")
    print(f"shipped (0.2, 4): valid {s['valid']['estimated_speedup']:.2f}x, test {s['test']['estimated_speedup']:.2f}x "
          f"(steps {s['test']['steps_vs_no_drafts']:.2f})")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
