"""fp32 linear layers on oneDNN (prepacked weights, ``modules.PackedLinear``) against torch's own path (oneMKL's sgemm),
the serving choice ``CHATFORGE_FP32_LINEAR`` makes (issue 16).

Same bundles, loaded twice with ``inference.load_model`` (once per choice), timed interleaved in one process:

* GPT-2 of ``configs/gpt_chatbot_kr.yaml``'s shape (4 layers, d_model 256, vocabulary 8,000; the bundle of
  ``benchmarks/served_generation.py``): greedy generation of ``new_tokens`` tokens (min = max) at batch 1, 8, 32
  (``decoding.generate`` / ``generate_batch``);
* the Transformer of ``configs/chatbot_kr_transformer.yaml``'s shape (2+2 layers, d_model 128): the same at batch 1
  and 8;
* BERT of ``configs/bert_clinc150.yaml``'s shape (4 layers, d_model 256, 151 labels; the bundle of
  ``benchmarks/served_classification.py``): ``Classifier.classify`` of 1 and of 32 texts.

Random weights (the work per token does not depend on them). Reported: tokens/s (texts/s), medians over
``reps`` repetitions after a warm-up, the ratio oneDNN / torch, and how far the two agree (greedy tokens identical,
largest logit or probability difference).

    nice -n 10 python benchmarks/fp32_linear.py --out benchmarks/results/fp32-linear [--size tiny]
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import served_classification as sc  # noqa: E402  (sibling scripts: bundles and inputs)
import served_generation as sg  # noqa: E402

from chatforge.bench import served  # noqa: E402

KERNELS = ("aten", "onednn")


def _load(bundle: Path, kernels: str):
    """``kernels``: aten, onednn (this CPU's packing policy) or onednn-avx2 (the AVX2 policy on an AVX-512 CPU)."""
    from chatforge import inference
    from chatforge.modules.linear import PACK_AVX2
    from chatforge.runtime import FP32_LINEAR_ENV

    old, policy = os.environ.get(FP32_LINEAR_ENV), inference.pack_policy
    os.environ[FP32_LINEAR_ENV] = kernels.split("-")[0]
    if kernels == "onednn-avx2":
        inference.pack_policy = lambda flags: PACK_AVX2
    try:
        return inference.load_model(bundle, "m")
    finally:
        inference.pack_policy = policy
        if old is None:
            os.environ.pop(FP32_LINEAR_ENV, None)
        else:
            os.environ[FP32_LINEAR_ENV] = old


def kernels_here() -> tuple[str, ...]:
    """The engines of a run: torch's path and oneDNN with this CPU's packing policy, plus the AVX2 policy where this
    CPU's is the AVX-512 one (so one run shows what the wider policy gains)."""
    from chatforge.modules.linear import pack_policy
    from chatforge.runtime import read_cpu_flags

    return (*KERNELS, "onednn-avx2") if pack_policy(read_cpu_flags()[1]).name == "avx512" else KERNELS


def _generation_case(gen, prompts: list[list[int]], n: int):
    from chatforge.decoding import GenerationOptions, generate, generate_batch

    opts = GenerationOptions(max_new_tokens=n, min_new_tokens=n)
    tok = gen.tok

    def run() -> tuple[int, Any]:
        if len(prompts) == 1:
            out = [generate(gen.model, prompts[0], opts, bos_id=tok.bos_id, eos_id=tok.eos_id)]
        else:
            out = generate_batch(gen.model, prompts, opts, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
        return sum(len(o) for o in out), out

    return run


def _classification_case(clf, texts: list[str]):
    def run() -> tuple[int, Any]:
        preds = clf.classify(texts)
        return len(texts), [p.scores if hasattr(p, "scores") else p.score for p in preds]

    return run


def _agree(a: Any, b: Any) -> dict[str, float]:
    if a and isinstance(a[0], list) and a[0] and isinstance(a[0][0], int):  # token ids
        same = sum(x == y for x, y in zip(a, b, strict=True))
        return {"identical_outputs": round(same / len(a), 4)}
    diff = 0.0
    for x, y in zip(a, b, strict=True):
        xs = list(x.values()) if isinstance(x, dict) else (x if isinstance(x, list) else [x])
        ys = list(y.values()) if isinstance(y, dict) else (y if isinstance(y, list) else [y])
        diff = max(diff, max(abs(float(p) - float(q)) for p, q in zip(xs, ys, strict=True)))
    return {"max_abs_diff": diff}


def run(out: Path, size: str = "full", reps: int = 5) -> dict[str, Any]:
    import torch

    from chatforge.bench.machine import cpus_available, is_loaded, load_average

    gsize = sg.SIZES[size]
    tsize = sg.FAMILIES["transformer"].sizes[size]
    csize = sc.SIZES[size]
    new_tokens = gsize.new_tokens
    batches = (1, 8, 32) if size == "full" else (1, 2)
    load_before = load_average()
    cases: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fp32-linear-") as tmp:
        work = Path(tmp)
        texts, corpus, gsource = sg.prompts_and_corpus(max(batches))
        gpt = sg.build_bundle(work / "gpt", gsize, corpus)
        ttexts, tcorpus, _ = sg.prompts_and_corpus(max(batches), sg.FAMILIES["transformer"].config)
        tfm = sg.build_bundle(work / "transformer", tsize, tcorpus, sg.FAMILIES["transformer"])
        ctexts, ccorpus, csource = sc.texts_and_corpus(32 if size == "full" else 4)
        bert = sc.build_bundle(work / "bert", csize, ccorpus)
        engines = kernels_here()
        loaded = {k: {name: _load(b, k) for name, b in (("gpt", gpt), ("transformer", tfm), ("bert", bert))}
                  for k in engines}
        packed = {k: sum(type(m).__name__ == "PackedLinear" for m in loaded[k]["gpt"].model.modules()) for k in engines}
        for k in engines:
            g = loaded[k]
            for b in batches:
                cases.setdefault(f"gpt generation, batch {b}", {})[k] = _generation_case(
                    g["gpt"], [g["gpt"].tok.encode(t) for t in texts[:b]], new_tokens)
            for b in batches[:2]:
                cases.setdefault(f"transformer generation, batch {b}", {})[k] = _generation_case(
                    g["transformer"], [g["transformer"].tok.encode(t) for t in ttexts[:b]], new_tokens)
            for b in (1, len(ctexts)):
                cases.setdefault(f"bert classification, batch {b}", {})[k] = _classification_case(g["bert"], ctexts[:b])
        rows = []
        with torch.inference_mode():
            for case, fns in cases.items():
                outs = {k: fns[k]()[1] for k in engines}  # warm-up, and the outputs compared
                times: dict[str, list[float]] = {k: [] for k in engines}
                for rep in range(reps):
                    for k in (engines if rep % 2 == 0 else engines[::-1]):
                        t0 = time.perf_counter()
                        n, _ = fns[k]()
                        times[k].append(n / (time.perf_counter() - t0))
                med = {k: statistics.median(v) for k, v in times.items()}
                rows.append({"case": case, "unit": "texts/s" if "classification" in case else "tokens/s",
                             **{f"{k}_per_s": round(med[k], 1) for k in engines},
                             "ratio": round(med["onednn"] / med["aten"], 3),
                             **({"ratio_avx2_policy": round(med["onednn-avx2"] / med["aten"], 3)}
                                if "onednn-avx2" in med else {}),
                             "reps": {k: [round(x, 1) for x in v] for k, v in times.items()},
                             "agreement": _agree(outs["aten"], outs["onednn"])})
    load_after = load_average()
    result = {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": served.machine_record(load_before, load_after, torch=torch.__version__),
        "loaded": is_loaded([load_before, load_after], cpus_available()),
        "config": {"gpt": sg.FAMILIES["gpt"].describe(gsize), "transformer": sg.FAMILIES["transformer"].describe(tsize),
                   "bert": f"BERT {csize.layers} layers, d_model {csize.d_model}, 151 labels, random weights",
                   "new_tokens": new_tokens, "prompts": gsource, "texts": csource, "reps": reps,
                   "packed_linear_layers_gpt": packed, "policy": _policy_name()},
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp32-linear.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (out / "fp32-linear.md").write_text(markdown(result))
    return result


def _policy_name() -> str:
    from chatforge.modules.linear import pack_policy
    from chatforge.runtime import read_cpu_flags

    return pack_policy(read_cpu_flags()[1]).name


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# fp32 linear layers: oneDNN (prepacked) vs torch's path ({result['created']})", "",
             f"{served.machine_line(result)}; torch {result['machine']['torch']}", "",
             f"Models: {result['config']['gpt']}; {result['config']['transformer']}; {result['config']['bert']}. "
             f"{result['config']['new_tokens']} new tokens (min = max), greedy; {result['config']['reps']} interleaved "
             "repetitions (median).", "",
             f"Packing policy here: {result['config'].get('policy', 'avx2')}" + (
                 " (the AVX2 policy beside it: oneDNN only for layers of 256 x 1,024 weights up and calls of at most "
                 "64 rows)" if any("ratio_avx2_policy" in r for r in result["rows"]) else ""), "",
             "| case | unit | torch (aten) | oneDNN | oneDNN / torch | AVX2 policy / torch | agreement |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        agree = ", ".join(f"{k} {v:g}" for k, v in r["agreement"].items())
        avx2 = f"{r['ratio_avx2_policy']:.2f}x" if "ratio_avx2_policy" in r else "-"
        lines.append(f"| {r['case']} | {r['unit']} | {r['aten_per_s']:,.1f} | {r['onednn_per_s']:,.1f} | "
                     f"{r['ratio']:.2f}x | {avx2} | {agree} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    print(markdown(run(args.out, args.size, args.reps)))


if __name__ == "__main__":
    main()
