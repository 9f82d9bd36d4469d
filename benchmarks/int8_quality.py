"""int8 serving quality against fp32 on real data, the same weights loaded both ways.

Generation (ChatbotData test split of the bundle's own config): greedy replies of the int8 model
(``load_model(..., precision="int8")``, the single-stream serving path) against the fp32 model's:
token agreement and the chrF (sacrebleu) of each against the reference answers.
Classification (CLINC150 val + oos_val, the bundle's own validation lists): argmax agreement of the
probabilities and in-scope accuracy / out-of-scope recall of each (the bundle's oos policy applied).

Token agreement, per reply, compares int8's tokens with fp32's position by position over the longer
of the two (a missing token counts as a disagreement), summed over all replies: ``position``. Once two
greedy replies diverge they continue from different prefixes, so ``prefix`` (tokens before the first
difference over the longer length) is the strict version and ``exact_replies`` the share identical.

    python benchmarks/int8_quality.py --generator RUN/bundle [--generator RUN2/bundle] --classifier RUN3/bundle
    python benchmarks/int8_quality.py --train W   # trains the short-budget bundles below into W first

``--train W`` runs (under nice -n 10) configs/chatbot_kr_transformer.yaml with train.epochs=4 and
configs/clinc150_transformer.yaml with train.epochs=6: minutes each on 2 CPU cores, not the configs'
full budgets. Writes runs/bench/int8-quality.json (``--publish``: benchmarks/results/) with ``chatforge.runtime.cpu_info()``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the _output module beside this script
from _output import add_output_options, output_path  # noqa: E402

TRAIN = {  # name -> (config, overrides): short budgets of the shipped configs
    "chatbot-kr-transformer": ("configs/chatbot_kr_transformer.yaml", ["train.epochs=4"]),
    "clinc150-transformer": ("configs/clinc150_transformer.yaml", ["train.epochs=6"]),
}


def train(workdir: Path) -> dict[str, Path]:
    out = {}
    for name, (config, sets) in TRAIN.items():
        run = workdir / name
        if not (run / "bundle").exists():
            cmd = ["nice", "-n", "10", sys.executable, "-m", "chatforge.cli", "train", config, "--run-dir", str(run),
                   "--no-progress", *[a for s in [*sets, "tracking.enabled=false"] for a in ("--set", s)]]
            subprocess.run(cmd, cwd=ROOT, check=True)
        out[name] = run / "bundle"
    return out


def token_agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    pos = prefix = total = exact = 0
    for x, y in zip(a, b, strict=True):
        n = max(len(x), len(y))
        total += n
        pos += sum(p == q for p, q in zip(x, y, strict=False))
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefix += k
        exact += x == y
    return {"position": pos / total if total else 1.0, "prefix": prefix / total if total else 1.0,
            "exact_replies": exact / len(a) if a else 1.0, "tokens_compared": total}


def generation_quality(bundle: Path, max_examples: int | None) -> dict:
    import sacrebleu

    from chatforge.decoding import GenerationOptions
    from chatforge.inference import load_model
    from chatforge.training.run import load_splits

    models = {p: load_model(bundle, "chat", precision=p) for p in ("fp32", "int8")}
    cfg = models["fp32"].bundle.config
    _, _, test, path = load_splits(cfg)
    test = test[:max_examples] if max_examples else test
    if not test:
        raise SystemExit(f"{bundle}: its config holds out no test split (data.test_fraction: 0)")
    opts = GenerationOptions(max_new_tokens=cfg.train.max_target_len)
    replies, tokens, seconds = {}, {}, {}
    for p, m in models.items():
        t0 = time.perf_counter()
        deltas = [list(m.stream(ex.text, opts)) for ex in test]
        seconds[p] = time.perf_counter() - t0
        tokens[p] = [[d.token_id for d in ds] for ds in deltas]
        replies[p] = [m.tok.decode(ids) for ids in tokens[p]]
    refs = [[ex.response for ex in test]]
    chrf = {p: sacrebleu.corpus_chrf(replies[p], refs).score for p in models}
    return {
        "bundle": str(bundle), "family": cfg.model.family, "data": str(path), "split": "test", "examples": len(test),
        "token_agreement": token_agreement(tokens["fp32"], tokens["int8"]),
        "chrf": chrf, "chrf_delta": chrf["int8"] - chrf["fp32"], "decode_seconds": seconds,
        "samples": [{"question": ex.text, "reference": ex.response, "fp32": a, "int8": b}
                    for ex, a, b in list(zip(test, replies["fp32"], replies["int8"], strict=True))[:8]],
    }


# --layers: which linear layers int8 covers, to find where greedy replies flip (name patterns of the families'
# modules: attention projections are *_attn.*/attn.*, the output layer lm_head).
# Each set's activations are quantized as serving's (``inference.full_range_activations``: 8 bits on CPUs with int8
# dot products), except the 7-bit set, torch's own dynamic layer (``reduce_range=True`` always), which serving used
# before: the same layers as "all", to measure what the eighth bit does.
LAYER_SETS = {
    "all": None,
    "all, 7-bit activations (torch's default)": None,
    "no-attention": r"attn",
    "no-output": r"lm_head$",
    "feed-forward only": r"attn|lm_head$",
}
SEVEN_BIT_SETS = ("all, 7-bit activations (torch's default)",)


def _plain_fp32(bundle: Path):
    """The fp32 model with plain ``nn.Linear`` layers (``CHATFORGE_FP32_LINEAR=aten``): on AMD CPUs serving packs
    them for oneDNN (``modules.PackedLinear``), which ``quantize_dynamic`` would leave unquantized."""
    from chatforge import inference
    from chatforge.runtime import FP32_LINEAR_ENV

    old = os.environ.get(FP32_LINEAR_ENV)
    os.environ[FP32_LINEAR_ENV] = "aten"
    try:
        return inference.load_model(bundle, "chat", precision="fp32")
    finally:
        if old is None:
            os.environ.pop(FP32_LINEAR_ENV, None)
        else:
            os.environ[FP32_LINEAR_ENV] = old


def layer_study(bundle: Path, max_examples: int | None) -> dict:
    """Greedy token agreement with fp32 when int8 covers only some linear layers (LAYER_SETS), with the share of
    matmul weights each set quantizes. Not a serving path: ``quantize_int8`` refuses sets below
    ``INT8_MIN_COVERAGE``; this applies torch's dynamic quantization to the set directly, then serving's activation
    width (``inference.full_range_activations``) except for ``SEVEN_BIT_SETS``."""
    import re
    import warnings

    import sacrebleu
    import torch

    from chatforge import inference
    from chatforge.decoding import GenerationOptions
    from chatforge.training.run import load_splits

    fp32 = inference.load_model(bundle, "chat", precision="fp32")
    cfg = fp32.bundle.config
    _, _, test, _ = load_splits(cfg)
    test = test[:max_examples] if max_examples else test
    opts = GenerationOptions(max_new_tokens=cfg.train.max_target_len)

    def greedy(m) -> list[list[int]]:
        return [[d.token_id for d in m.stream(ex.text, opts)] for ex in test]

    base = greedy(fp32)
    refs = [[ex.response for ex in test]]
    out = {"bundle": str(bundle), "examples": len(test),
           "chrf_fp32": sacrebleu.corpus_chrf([fp32.tok.decode(t) for t in base], refs).score, "sets": {}}
    for name, skip in LAYER_SETS.items():
        m = _plain_fp32(bundle)
        spec, _ = inference._int8_plan(m.model)
        spec = {k: v for k, v in spec.items() if not (skip and re.search(skip, k))}
        weights = {k: mod.weight.numel() for k, mod in m.model.named_modules() if isinstance(mod, torch.nn.Linear)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(m.model.eval(), spec, dtype=torch.qint8, inplace=True)
        full = 0 if name in SEVEN_BIT_SETS else inference.full_range_activations(m.model)
        toks = greedy(m)
        out["sets"][name] = {
            "linear_weight_share": sum(weights.get(k, 0) for k in spec) / sum(weights.values()),
            "activation_bits": 8 if full else 7,
            "token_agreement": token_agreement(base, toks),
            "chrf": sacrebleu.corpus_chrf([m.tok.decode(t) for t in toks], refs).score,
        }
    return out


# --margins: how close fp32's own greedy choices are, against how far int8 moves them.
MARGIN_LEVELS = (0.005, 0.01, 0.02, 0.05, 0.1)
ERROR_SCALES = (1.0, 0.5, 0.25, 0.125)


def margin_study(bundle: Path, max_examples: int | None) -> dict:
    """Why greedy int8 replies leave fp32's: along each fp32 greedy reply (both models fed fp32's tokens through
    the serving step path, ``init_state``/``decode_step``, so int8 quantizes each step's activations as it does
    when serving), fp32's margin between its chosen token and its runner-up, and int8's error on that margin.
    ``flips`` counts the replies in which int8, fed fp32's prefix, would pick another token at some step, with
    int8's logit error as measured (scale 1) and scaled down (logits fp32 + s * (int8 - fp32)): how much smaller
    int8's error would have to be for a given share of replies to stay identical."""
    import numpy as np
    import torch

    from chatforge.decoding import GenerationOptions, _start_tokens
    from chatforge.inference import load_model
    from chatforge.training.run import load_splits

    fp32, int8 = (load_model(bundle, "chat", precision=p) for p in ("fp32", "int8"))
    cfg = fp32.bundle.config
    _, _, test, _ = load_splits(cfg)
    test = test[:max_examples] if max_examples else test
    opts = GenerationOptions(max_new_tokens=cfg.train.max_target_len)
    margins, errors, reply_min, flips = [], [], [], {s: 0 for s in ERROR_SCALES}
    mismatched = 0
    for ex in test:
        toks = [d.token_id for d in fp32.stream(ex.text, opts)]
        ids = fp32.encode_prompt(ex.text)[0][: fp32.max_input_tokens] or [fp32.tok.unk_id]
        src = torch.tensor([ids])
        flipped = dict.fromkeys(ERROR_SCALES, False)
        rm = float("inf")
        with torch.inference_mode():
            s32, s8 = fp32.model.init_state(src), int8.model.init_state(src)
            cur = _start_tokens(s32, src, fp32.tok.bos_id)
            for t in toks:
                a = fp32.model.decode_step(cur, s32).float()[0]
                b = int8.model.decode_step(cur, s8).float()[0]
                top = a.topk(2)
                mismatched += int(top.indices[0]) != t
                m = float(top.values[0] - top.values[1])
                i1, i2 = int(top.indices[0]), int(top.indices[1])
                margins.append(m)
                errors.append(abs(float(b[i1] - b[i2]) - m))
                rm = min(rm, m)
                for s in ERROR_SCALES:
                    flipped[s] |= int((a + s * (b - a)).argmax()) != i1
                cur = torch.tensor([[t]])
        reply_min.append(rm)
        for s in ERROR_SCALES:
            flips[s] += flipped[s]
    margins, errors, reply_min = np.asarray(margins), np.asarray(errors), np.asarray(reply_min)
    n = len(test)
    return {
        "bundle": str(bundle), "examples": n, "steps": int(margins.size),
        "steps_where_fp32_step_path_disagrees_with_its_stream": mismatched,
        "fp32_margin": {"median": float(np.median(margins)),
                        "share_of_steps_below": {str(x): float((margins < x).mean()) for x in MARGIN_LEVELS},
                        "share_of_replies_with_a_step_below": {str(x): float((reply_min < x).mean())
                                                               for x in MARGIN_LEVELS}},
        "int8_margin_error": {"median": float(np.median(errors)), "p90": float(np.percentile(errors, 90)),
                              "max": float(errors.max()) if errors.size else 0.0},
        "share_of_replies_int8_would_flip_at_error_scale": {str(s): flips[s] / n for s in ERROR_SCALES},
    }


def backend_quality(bundle: Path, max_examples: int | None) -> dict:
    """GPT generators: greedy replies of every int8/fp32 serving path against torch fp32's, on the same test
    questions: torch int8 (``quantize_int8``) and the CTranslate2 backend in float32 and int8
    (``chatforge serve --backend ctranslate2``; serving/backend_ct2.py), each with token agreement and chrF."""
    import sacrebleu

    from chatforge.decoding import GenerationOptions
    from chatforge.inference import load_model
    from chatforge.serving.backend_ct2 import CT2Generator
    from chatforge.training.run import load_splits

    ref = load_model(bundle, "chat", precision="fp32")
    cfg = ref.bundle.config
    _, _, test, _ = load_splits(cfg)
    test = test[:max_examples] if max_examples else test
    opts = GenerationOptions(max_new_tokens=cfg.train.max_target_len)
    refs = [[ex.response for ex in test]]

    def replies(m) -> tuple[list[list[int]], list[str]]:
        deltas = [list(m.stream(ex.text, opts)) for ex in test]
        return [[d.token_id for d in ds] for ds in deltas], ["".join(d.text for d in ds) for ds in deltas]

    base, base_text = replies(ref)
    out = {"bundle": str(bundle), "family": cfg.model.family, "examples": len(test),
           "chrf_torch_fp32": sacrebleu.corpus_chrf(base_text, refs).score, "paths": {}}
    paths = {"torch-int8": lambda: load_model(bundle, "chat", precision="int8"),
             "ctranslate2-float32": lambda: CT2Generator(bundle, "chat", precision="fp32"),
             "ctranslate2-int8": lambda: CT2Generator(bundle, "chat", precision="int8")}
    for name, make in paths.items():
        m = make()
        try:
            toks, text = replies(m)
        finally:
            getattr(m, "close", lambda: None)()
        chrf = sacrebleu.corpus_chrf(text, refs).score
        out["paths"][name] = {"token_agreement": token_agreement(base, toks), "chrf": chrf,
                              "chrf_delta": chrf - out["chrf_torch_fp32"]}
    return out


def classification_quality(bundle: Path) -> dict:
    import numpy as np

    from chatforge.inference import load_model
    from chatforge.oos import oos_metrics
    from chatforge.training.run import load_splits

    models = {p: load_model(bundle, "intent", precision=p) for p in ("fp32", "int8")}
    cfg = models["fp32"].bundle.config
    _, valid, _, path = load_splits(cfg)
    texts, gold = [ex.text for ex in valid], [ex.label for ex in valid]
    out, argmax = {}, {}
    for p, m in models.items():
        preds, probs = [], []
        for i in range(0, len(texts), 64):
            batch = texts[i: i + 64]
            probs.append(m.predict_proba(batch))
            preds += [c.label for c in m.classify(batch)]
        argmax[p] = np.concatenate(probs).argmax(1)
        met = oos_metrics(gold, preds, m.oos.label)
        out[p] = {"in_scope_accuracy": met["in_scope_accuracy"], "oos_recall": met["oos_recall"],
                  "accuracy": float(np.mean([a == b for a, b in zip(gold, preds, strict=True)]))}
    return {
        "bundle": str(bundle), "family": cfg.model.family, "data": str(path), "split": "val + oos_val",
        "examples": len(texts), "argmax_agreement": float((argmax["fp32"] == argmax["int8"]).mean()),
        **{p: out[p] for p in models},
        "in_scope_accuracy_delta_points": 100 * (out["int8"]["in_scope_accuracy"] - out["fp32"]["in_scope_accuracy"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generator", type=Path, action="append", default=[])
    ap.add_argument("--classifier", type=Path, action="append", default=[])
    ap.add_argument("--train", type=Path, help="train the short-budget bundles into this folder first")
    ap.add_argument("--max-examples", type=int, help="generation: first N test examples only")
    ap.add_argument("--backends", action="store_true",
                    help="generation (GPT bundles): also torch int8 and the CTranslate2 backend (float32, int8) "
                         "against torch fp32")
    ap.add_argument("--layers", action="store_true",
                    help="generation: also measure agreement when int8 covers only some linear layers (LAYER_SETS)")
    ap.add_argument("--margins", action="store_true",
                    help="generation: also fp32's top-1/top-2 margins along its greedy replies against int8's error on "
                         "them, and the share of replies int8 would flip with that error scaled down")
    add_output_options(ap, "int8-quality.json")
    args = ap.parse_args()
    args.out = output_path(args, "int8-quality.json")
    os.chdir(ROOT)  # the configs' data paths are relative to the repository root

    from chatforge.runtime import configure_threads, cpu_info, set_omp_wait_policy

    set_omp_wait_policy()
    import torch

    if args.train:
        trained = train(args.train)
        args.generator.append(trained["chatbot-kr-transformer"])
        args.classifier.append(trained["clinc150-transformer"])
    configure_threads()
    before = cpu_info()
    gen = [generation_quality(b, args.max_examples) for b in args.generator]
    cls = [classification_quality(b) for b in args.classifier]
    layers = [layer_study(b, args.max_examples) for b in args.generator] if args.layers else []
    backends = [backend_quality(b, args.max_examples) for b in args.generator] if args.backends else []
    margins = [margin_study(b, args.max_examples) for b in args.generator] if args.margins else []
    acceptance = {
        "generation": [{"bundle": g["bundle"], "token_agreement>=0.95": g["token_agreement"]["position"] >= 0.95,
                        "chrf_within_1": abs(g["chrf_delta"]) <= 1.0} for g in gen],
        "classification": [{"bundle": c["bundle"], "argmax_agreement>=0.995": c["argmax_agreement"] >= 0.995,
                            "in_scope_accuracy_within_0.3": abs(c["in_scope_accuracy_delta_points"]) <= 0.3}
                           for c in cls],
    }
    result = {"benchmark": "int8_quality", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine_before": before, "machine_after": cpu_info(), "torch": torch.__version__,
              "generation": gen, "classification": cls, "acceptance": acceptance,
              **({"layers": layers} if layers else {}), **({"backends": backends} if backends else {}),
              **({"margins": margins} if margins else {})}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    summary = {"generation": [{k: g[k] for k in ("family", "examples", "token_agreement", "chrf")} for g in gen],
               "classification": [{k: c[k] for k in ("family", "examples", "argmax_agreement", "fp32", "int8")}
                                  for c in cls], "acceptance": acceptance,
               **({"layers": [{k: {n: (v["token_agreement"]["position"], round(v["linear_weight_share"], 3))
                                   for n, v in ly["sets"].items()} if k == "sets" else ly[k]
                               for k in ("bundle", "sets")} for ly in layers]} if layers else {}),
               **({"backends": [{n: (v["token_agreement"]["position"], round(v["chrf_delta"], 2))
                                 for n, v in b["paths"].items()} for b in backends]} if backends else {}),
               **({"margins": [{k: m[k] for k in ("examples", "int8_margin_error",
                                                  "share_of_replies_int8_would_flip_at_error_scale")}
                               for m in margins]} if margins else {})}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
