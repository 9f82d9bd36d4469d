"""Does removing the per-layer, per-token Python of GPT decoding pay on CPU? Eager vs ``torch.compile``.

Greedy decoding of a random-weight GPT (chatforge's own ``GPTConfig``/``build``) at batch 1 and 8, the
prompt prefilled eagerly, then ``--new-tokens`` decoding steps timed by variant:

* ``eager``: the shipped path, ``GPTLMHeadModel.decode_step`` (``GPTModel.decode`` with its
  ``decode_plan`` over ``GrowingKVCache``s), then ``argmax``.
* ``compiled_dynamic``: that same ``decode_step`` under ``torch.compile(dynamic=True)``; the cache
  length grows every step, so shapes change per token (symbolic shapes, or recompiles).
* ``static_eager`` / ``compiled_static``: a static-shape step written here: fixed-capacity K/V buffers
  (layers, B, H, C, Dh) written at a step index tensor, attention masked to the filled positions, the
  argmax inside the step; shapes never change, so ``torch.compile(dynamic=False)`` builds one graph
  for the whole reply. ``static_eager`` is the same function uncompiled (the static layout's own cost).

Each variant runs one warm-up reply first (for the compiled ones: the compile, reported separately
as ``warmup_s`` minus eager's), then ``--repeats`` rounds interleave the variants (eager, compiled, ...,
eager, compiled, ...) so a change in the machine's load lands on all. Greedy outputs are compared
with eager's, position by position. ``chatforge.runtime.cpu_info()`` (CPU model, threads, load) is
recorded before and after.

    nice -n 10 python benchmarks/compiled_step.py [--batches 1 8] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the _output module beside this script
from _output import add_output_options, output_path  # noqa: E402

VARIANTS = ("eager", "compiled_dynamic", "static_eager", "compiled_static")
COMPILED = ("compiled_dynamic", "compiled_static")


def build_gpt(layers: int, d_model: int, heads: int, vocab: int, positions: int, seed: int = 0):
    import torch

    from chatforge.models.gpt.config import GPTConfig
    from chatforge.models.gpt.model import build
    from chatforge.registry import BuildContext
    from chatforge.tokenizer import SpecialIds

    torch.manual_seed(seed)
    cfg = GPTConfig(d_model=d_model, n_heads=heads, n_layers=layers, n_positions=positions)
    model = build(cfg, BuildContext(task="lm", vocab_size=vocab, special=SpecialIds()))
    return model.eval()


def static_step_fn(model) -> Callable:
    """A static-shape decoding step over fixed-capacity buffers; the same arithmetic as
    ``GPTModel.decode`` + the LM head for one new token per row (eval mode, unpadded prompts).

    step(tokens (B, 1), pos (B, 1), idx (1,) the column to write, k_buf/v_buf: L tensors (B, H, C, Dh))
    -> (next tokens (B, 1), logits (B, V)); writes the new keys/values into the buffers in place."""
    import torch
    import torch.nn.functional as F

    plan = model.transformer.decode_plan()
    lm_w = model.lm_head.weight
    wte, wpe, blocks, ln = plan

    def step(tokens, pos, idx, k_buf, v_buf):
        b = tokens.size(0)
        cap = k_buf[0].size(2)
        # Keys at columns <= idx are filled (the prompt, then one per step): the mask replaces the slice.
        mask = (torch.arange(cap, device=tokens.device) <= idx)[None, None, None, :]  # (1, 1, 1, C)
        x = F.embedding(tokens, wte) + F.embedding(pos, wpe)  # (B, 1, D)
        for i, p in enumerate(blocks):
            def attend(h, i=i, p=p):
                q, k, v = p.qkv(h).view(b, 1, 3, p.n_heads, p.head_dim).permute(2, 0, 3, 1, 4)
                k_buf[i].index_copy_(2, idx, k)  # (B, H, C, Dh), one column written
                v_buf[i].index_copy_(2, idx, v)
                y = F.scaled_dot_product_attention(q, k_buf[i], v_buf[i], attn_mask=mask)  # (B, H, 1, Dh)
                return p.out(y.transpose(1, 2).reshape(b, 1, p.d_model))

            (w1, b1, e1), (w2, b2, e2) = p.ln1, p.ln2
            if p.norm_first:
                x = x + attend(F.layer_norm(x, p.shape, w1, b1, e1))
                x = x + p.fc2(p.act(p.fc1(F.layer_norm(x, p.shape, w2, b2, e2))))
            else:
                x = F.layer_norm(x + attend(x), p.shape, w1, b1, e1)
                x = F.layer_norm(x + p.fc2(p.act(p.fc1(x))), p.shape, w2, b2, e2)
        if ln is not None:
            x = F.layer_norm(x, ln[0], ln[1], ln[2], ln[3])
        logits = F.linear(x[:, 0], lm_w)  # (B, V)
        return logits.argmax(-1, keepdim=True), logits

    return step


class Runner:
    """Greedy replies by one variant: ``run(prompt)`` -> (tokens (B, new), logits (new, B, V), decode seconds)."""

    def __init__(self, model, variant: str, new_tokens: int):
        import torch

        self.model, self.variant, self.new_tokens = model, variant, new_tokens
        if variant in ("eager", "compiled_dynamic"):
            step = model.decode_step
            self.step = torch.compile(step, dynamic=True) if variant == "compiled_dynamic" else step
        else:
            step = static_step_fn(model)
            self.step = torch.compile(step, dynamic=False, fullgraph=True) if variant == "compiled_static" else step

    def run(self, prompt) -> tuple[list[list[int]], Any, float]:
        import torch

        with torch.inference_mode():
            state = self.model.init_state(prompt)  # eager prefill, the same for every variant
            if self.variant in ("eager", "compiled_dynamic"):
                tok, out, logits = state.start_tokens, [], []
                t0 = time.perf_counter()
                for _ in range(self.new_tokens):
                    logits.append(self.step(tok, state))  # (B, V)
                    tok = logits[-1].argmax(-1, keepdim=True)  # (B, 1)
                    out.append(tok)
                dt = time.perf_counter() - t0
            else:
                n_layers = len(state.caches)
                b, h, filled, dh = state.caches[0].k.shape
                cap = filled + self.new_tokens
                # One buffer per layer, not views of one tensor: a compiled graph that mutates views of a
                # shared base copies the whole base back (measured: 0.55x eager at batch 8).
                k_buf = [state.caches[0].k.new_zeros((b, h, cap, dh)) for _ in range(n_layers)]
                v_buf = [torch.zeros_like(k) for k in k_buf]
                for i, c in enumerate(state.caches):
                    k_buf[i][:, :, :filled] = c.k
                    v_buf[i][:, :, :filled] = c.v
                tok, pos, out, logits = state.start_tokens, state.next_pos[:, None], [], []
                idx = torch.tensor([filled])
                t0 = time.perf_counter()
                for _ in range(self.new_tokens):
                    tok, lg = self.step(tok, pos, idx, k_buf, v_buf)
                    logits.append(lg)
                    out.append(tok)
                    pos = pos + 1
                    idx = idx + 1
                dt = time.perf_counter() - t0
        return torch.cat(out, 1).tolist(), torch.stack(logits), dt


def token_agreement(ref: list[list[int]], other: list[list[int]]) -> dict:
    """Share of positions where ``other`` equals ``ref`` (same shapes: greedy, fixed length), and
    whether every reply is identical."""
    total = sum(len(r) for r in ref)
    same = sum(a == b for r, o in zip(ref, other, strict=True) for a, b in zip(r, o, strict=True))
    return {"position": same / total if total else 1.0, "identical": ref == other, "tokens_compared": total}


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def measure(model, batch: int, prompt_len: int, new_tokens: int, repeats: int, variants: list[str],
            vocab: int, seed: int) -> dict:
    import torch

    torch._dynamo.reset()  # each batch size compiles afresh, so its compile time is its own
    g = torch.Generator().manual_seed(seed + batch)
    prompt = torch.randint(4, vocab, (batch, prompt_len), generator=g)  # no pad id: rows are unpadded
    runners = {v: Runner(model, v, new_tokens) for v in variants}
    warmup, outputs, logits, dynamo = {}, {}, {}, {}
    for v, r in runners.items():
        before = _dynamo_counts()
        t0 = time.perf_counter()
        outputs[v], logits[v], _ = r.run(prompt)
        warmup[v] = time.perf_counter() - t0
        after = _dynamo_counts()
        dynamo[v] = {"warmup": {k: after[k] - before[k] for k in after}}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):  # interleaved: eager, compiled, ..., eager, compiled, ...
        for v, r in runners.items():
            before = _dynamo_counts()
            toks, _, dt = r.run(prompt)
            after = _dynamo_counts()
            times[v].append(dt)
            if v in dynamo:
                timed = dynamo[v].setdefault("timed", {k: 0 for k in after})
                for k in after:
                    timed[k] += after[k] - before[k]
            if toks != outputs[v]:
                raise RuntimeError(f"{v}: greedy output changed between runs of the same prompt")
    n = batch * new_tokens
    res: dict[str, dict] = {}
    for v in variants:
        med = statistics.median(times[v])
        res[v] = {"tokens_per_s_median": n / med, "tokens_per_s_best": n / min(times[v]),
                  "ms_per_step_median": med / new_tokens * 1e3, "ms_per_step_best": min(times[v]) / new_tokens * 1e3,
                  "warmup_s": warmup[v], "decode_s": times[v]}
        if v in COMPILED:
            # The warm-up reply includes the compile; what eager spends on the same reply is not compile.
            res[v]["compile_s"] = warmup[v] - (warmup["eager"] if "eager" in warmup else 0.0)
            res[v]["dynamo"] = dynamo[v]
        if v != "eager" and "eager" in times:
            res[v]["speedup_vs_eager_median"] = statistics.median(times["eager"]) / med
            res[v]["agreement_with_eager"] = token_agreement(outputs["eager"], outputs[v])
            # Logits compare while the greedy paths agree (after a flip they continue from other prefixes).
            n_cmp = next((i + 1 for i in range(new_tokens)
                          if any(r[i] != o[i] for r, o in zip(outputs["eager"], outputs[v], strict=True))),
                         new_tokens)
            res[v]["max_abs_logit_diff_vs_eager"] = float((logits[v][:n_cmp] - logits["eager"][:n_cmp]).abs().max())
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="eager is the reference of speed-ups and agreement; leave the compiled ones out "
                         "for a quick structural run")
    ap.add_argument("--warm-compile-cache", action="store_true",
                    help="use inductor's on-disk cache as it is (a restart's compile); default: a fresh empty "
                         "cache, so compile_s is a first deployment's")
    ap.add_argument("--seed", type=int, default=0)
    add_output_options(ap, "compiled-step.json")
    args = ap.parse_args(argv)
    args.out = output_path(args, "compiled-step.json")
    if "eager" not in args.variants:
        ap.error("--variants must include eager (the reference)")

    from chatforge.runtime import cpu_info, set_omp_wait_policy

    cache_dir, saved_cache_env = None, os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not args.warm_compile_cache:
        cache_dir = tempfile.TemporaryDirectory(prefix="chatforge-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir.name  # read when inductor first compiles

    set_omp_wait_policy()  # as the chatforge CLI does, before torch loads
    import torch

    torch.set_num_threads(args.threads)
    before = cpu_info()
    model = build_gpt(args.layers, args.d_model, args.heads, args.vocab, args.prompt_len + args.new_tokens + 8,
                      args.seed)
    results = {}
    for b in args.batches:
        results[f"batch{b}"] = measure(model, b, args.prompt_len, args.new_tokens, args.repeats, args.variants,
                                       args.vocab, args.seed)
        summary = {v: round(r["tokens_per_s_median"], 1) for v, r in results[f"batch{b}"].items()}
        print(f"batch {b} tokens/s (median):", summary, file=sys.stderr, flush=True)
    out = {
        "benchmark": "compiled_step",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine_before": before, "machine_after": cpu_info(), "loadavg_after": list(os.getloadavg()),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
        "note": "decode steps only (prefill excluded); compile_s = warm-up reply minus eager's warm-up reply",
    }
    if cache_dir is not None:
        cache_dir.cleanup()
        if saved_cache_env is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved_cache_env
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(args.out)  # atomic: a reader never sees half a file
    return out


if __name__ == "__main__":
    main()
