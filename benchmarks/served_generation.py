"""Served generation (GPT, or the Transformer encoder-decoder) through the real gRPC server against CTranslate2
called directly (issue 16).

Engines, every one on the same weights and prompts:

* served (a ``chatforge serve`` process each, streamed over gRPC from this process with ``grpc.aio``):
  chatforge torch fp32, torch int8 (``--precision int8``), and the CTranslate2 backend float32 and int8
  (``--backend ctranslate2 --precision fp32|int8``); and torch bf16 (``--precision bf16``) on a CPU with native
  bf16 matmuls (AMX or avx512_bf16, ``runtime.native_bf16``), where it is a serving choice; elsewhere bf16 is
  emulated and not served;
* anchors, in this process: ``ctranslate2.Generator`` (``--family gpt``) or ``ctranslate2.Translator``
  (``--family transformer``) float32 and int8 on the same conversion the backend makes
  (``serving.backend_ct2.convert_bundle``) and the same model inputs (the backend's adapter builds them: the
  GPT prompt ``<s> q [SEP]``, the Transformer's encoder source), one prompt at a time (``generate_batch`` /
  ``translate_batch`` of one) and 8 prompts as one batch; greedy, the tokenizer's ``</s>`` ending a reply and
  ``new_tokens`` at most (``max_length`` / ``max_decoding_length``), as the backend asks; time to first token
  from its per-step callback.

Cases: one stream (the prompts one after another: tokens/s over the summed request times, median time to
first token) and 8 concurrent streams (8 prompts at once: tokens over the wall time of the group, median
time to first token of the 8). Greedy, at most ``new_tokens`` per reply; the fp32 engines give the same tokens
(reported), so they do the same work, and tokens/s counts the tokens each produced. No min_new_tokens: a
request with one would share a CTranslate2 batch only with rows needing the same number of tokens more,
which keeps the CTranslate2 backend from taking arrivals into a running batch (serving.backend_ct2). Repetitions are interleaved across engines (the order rotates each
repetition); a warm-up round is not timed.

Weights, random, of a config's shape, with a SentencePiece vocabulary trained on its ChatbotData training
split: ``--family gpt`` (default) ``configs/gpt_chatbot_kr.yaml``'s GPT-2 (4 layers, d_model 256, vocabulary
8000); ``--family transformer`` ``configs/chatbot_kr_transformer.yaml``'s post-LN Transformer (2 encoder and 2
decoder layers, d_model 128, d_ff 512, 4 heads, unigram vocabulary 4000, max_len 512). Prompts are that
config's ChatbotData test questions (synthetic sentences when ``../shared/data`` is absent). Untrained weights
do not change the work per token, which is what is timed; greedy agreement with chatforge torch fp32 is
reported beside.

    nice -n 10 python benchmarks/served_generation.py --out benchmarks/results/served-generation [--size tiny]
    nice -n 10 python benchmarks/served_generation.py --family transformer --out benchmarks/results/served-generation-transformer

Threads: every server sizes its pools as ``chatforge serve`` does (the CPUs available less one,
``runtime.serving_threads``); ``--server-threads 2`` also serves every engine under ``OMP_NUM_THREADS=2`` (named
``<engine>-2t``) in the same interleaved run, and ``--anchor-threads 1 2`` times the direct anchor at each count
(``<anchor>-1t``; the plain name is the one at every CPU), so each side can be read at its best.

Writes ``served-generation.json``, ``served-generation.md`` and ``served-generation.png`` under ``--out``
(one family per folder; the JSON records which), with the CPU model (lscpu), the load before and after, and
whether the machine was loaded (then the figures are ratios only).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from chatforge.bench import machine, served

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gpt_chatbot_kr.yaml"


class Size(NamedTuple):  # not a dataclass: the tests load this file without registering it as a module
    layers: int  # GPT: n_layers; Transformer: encoder layers and decoder layers each
    d_model: int
    heads: int
    vocab: int
    positions: int  # GPT: n_positions; Transformer: max_len
    new_tokens: int
    single_prompts: int  # prompts one after another per repetition (the one-stream case)
    concurrent: int  # streams at once (the concurrent case)
    reps: int
    d_ff: int = 0  # Transformer only (GPT-2's is 4 d_model)


SIZES = {
    "full": Size(layers=4, d_model=256, heads=4, vocab=8000, positions=128, new_tokens=64, single_prompts=4,
                 concurrent=8, reps=5),
    "tiny": Size(layers=1, d_model=32, heads=2, vocab=1200, positions=64, new_tokens=4, single_prompts=2,
                 concurrent=2, reps=1),
}


# ------------------------------------------------------------------------------------------ families
def _gpt_model(size: Size) -> dict[str, Any]:
    return {"family": "gpt", "task": "generation", "variant": "gpt2", "d_model": size.d_model,
            "n_heads": size.heads, "n_layers": size.layers, "n_positions": size.positions, "dropout": 0.0,
            "attn_dropout": 0.0}


def _transformer_model(size: Size) -> dict[str, Any]:
    return {"family": "transformer", "task": "generation", "d_model": size.d_model, "n_heads": size.heads,
            "num_encoder_layers": size.layers, "num_decoder_layers": size.layers, "d_ff": size.d_ff,
            "max_len": size.positions, "dropout": 0.0}


def _generate(generator, inputs: list[list[str]], n: int, **kw: Any) -> list[list[int]]:
    res = generator.generate_batch(inputs, max_length=n, sampling_topk=1, include_prompt_in_result=False, **kw)
    return [r.sequences_ids[0] for r in res]


def _translate(translator, inputs: list[list[str]], n: int, **kw: Any) -> list[list[int]]:
    from chatforge.serving.backend_ct2 import _token_id

    # As the backend's Translator batches: greedy (beam_size 1: the callback needs it; translate_batch's
    # default is 2), at most n tokens from <s>, the inputs already cut to the model's max_len.
    res = translator.translate_batch(inputs, beam_size=1, sampling_topk=1, max_decoding_length=n,
                                     max_input_length=0, **kw)
    return [[_token_id(t) for t in r.hypotheses[0]] for r in res]


class Family(NamedTuple):
    config: Path  # the config whose shape (and data split) the random-weight bundle takes
    sizes: dict[str, Size]
    model: Callable[[Size], dict[str, Any]]  # the config's model section at a size
    describe: Callable[[Size], str]
    tokenizer: str  # SentencePiece model_type
    anchor: str  # the ctranslate2 class called directly
    decode: Callable[..., list[list[int]]]  # (ct2 model, inputs, most new tokens, **kw) -> reply ids
    title: str


FAMILIES = {
    "gpt": Family(CONFIG, SIZES, _gpt_model, lambda s: (
        f"GPT-2 {s.layers} layers, d_model {s.d_model}, {s.heads} heads, vocab {s.vocab} (SentencePiece), "
        f"n_positions {s.positions}, random weights"), "unigram", "Generator", _generate,
        "Served generation vs CTranslate2"),
    "transformer": Family(
        ROOT / "configs" / "chatbot_kr_transformer.yaml",
        {"full": Size(layers=2, d_model=128, heads=4, d_ff=512, vocab=4000, positions=512, new_tokens=64,
                      single_prompts=4, concurrent=8, reps=5),
         "tiny": Size(layers=1, d_model=32, heads=2, d_ff=64, vocab=1200, positions=64, new_tokens=4,
                      single_prompts=2, concurrent=2, reps=1)},
        _transformer_model, lambda s: (
            f"Transformer (post-LN encoder-decoder) {s.layers}+{s.layers} layers, d_model {s.d_model}, d_ff "
            f"{s.d_ff}, {s.heads} heads, vocab {s.vocab} (SentencePiece), max_len {s.positions}, random weights"),
        "unigram", "Translator", _translate, "Served Transformer generation vs CTranslate2 Translator"),
}
# name -> (backend, precision) of a served engine
SERVED = {"chatforge-torch-fp32": ("torch", "fp32"), "chatforge-torch-int8": ("torch", "int8"),
          "chatforge-ct2-float32": ("ctranslate2", "fp32"), "chatforge-ct2-int8": ("ctranslate2", "int8")}
# Served only on a CPU with native bf16 matmuls (AMX or avx512_bf16); elsewhere bf16 is emulated, many times slower.
BF16_ENGINE = ("chatforge-torch-bf16", ("torch", "bf16"))


def served_engines(native_bf16: bool, draft_tokens: int = 0, eager_step: bool = False) -> dict[str, tuple[str, str]]:
    """The served engines of a run: :data:`SERVED`, plus torch bf16 where the CPU computes bf16 natively, plus
    with ``draft_tokens`` the torch engines again with speculative decoding (``serve --draft-tokens``), named
    ``<engine>-draft<N>``; the others are then served with ``--draft-tokens 0``. ``eager_step``: the torch fp32 and
    int8 engines again with ``CHATFORGE_DECODE_STEP=eager`` (named ``<engine>-eager``), the decoding step as it was
    before the scripted one (``chatforge.models.gpt.scripted``), so one run measures what scripting gives served."""
    engines = {**SERVED, **(dict([BF16_ENGINE]) if native_bf16 else {})}
    if draft_tokens:
        engines.update({f"{k}-draft{draft_tokens}": v for k, v in engines.items() if v[0] == "torch"})
    if eager_step:
        engines.update({f"{k}-eager": v for k, v in engines.items() if v in (("torch", "fp32"), ("torch", "int8"))})
    return engines


def server_env(engine: str, threads: int | None) -> dict[str, str] | None:
    """A served engine's environment: its thread count (``served.thread_env``) and, for ``<engine>-eager``,
    ``CHATFORGE_DECODE_STEP=eager``."""
    env = dict(served.thread_env(threads) or {})
    if engine.endswith("-eager"):
        env["CHATFORGE_DECODE_STEP"] = "eager"
    return env or None


def serve_args(engine: str) -> list[str]:
    """``chatforge serve`` flags of a served engine beyond backend and precision: its draft tokens."""
    n = engine.rsplit("-draft", 1)[1].split("-")[0] if "-draft" in engine else "0"
    return ["--draft-tokens", n]
ANCHORS = {"ct2-direct-float32": "float32", "ct2-direct-int8": "int8"}


def is_anchor(engine: str) -> bool:
    return engine.startswith("ct2-direct-")
REFERENCE = "chatforge-torch-fp32"
CASES = ("1 stream", "concurrent")


# ------------------------------------------------------------------------------------------ inputs
def prompts_and_corpus(n: int, config: Path = CONFIG) -> tuple[list[str], list[str], str]:
    """(test questions, tokenizer training texts, where they came from)."""
    try:
        from chatforge.config import load_config
        from chatforge.training.run import load_splits

        train, _, test, path = load_splits(load_config(config))
        questions = [e.text for e in test if 2 <= len(e.text) <= 60]
        if len(questions) >= n:
            return questions[:n], [t for e in train for t in (e.text, e.response) if t], \
                f"ChatbotData test questions ({path.name}, split of {config.name})"
    except Exception as e:  # noqa: BLE001 - the data set is optional: synthetic prompts then
        print(f"ChatbotData unavailable ({type(e).__name__}: {e}); synthetic prompts", file=sys.stderr)
    from chatforge.bench.cases import sample_texts

    corpus = sample_texts()
    return [corpus[i % len(corpus)] for i in range(n)], corpus, "synthetic (the packaged sample corpus)"


def build_bundle(out: Path, size: Size, corpus: list[str], family: Family = FAMILIES["gpt"]) -> Path:
    import torch

    from chatforge.bundle import build_from_config, save_bundle
    from chatforge.config import validate_config
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.train(corpus, vocab_size=size.vocab, model_type=family.tokenizer, on_vocab_too_large="lower")
    cfg = validate_config({"name": "served-generation", "data": {"path": "bench"}, "tracking": {"enabled": False},
                           "model": family.model(size), "train": {"max_source_len": 40}},
                          source="served_generation")
    torch.manual_seed(0)
    return save_bundle(out, model=build_from_config(cfg, tok, None).eval(), tokenizer=tok, config=cfg, labels=None)


# ------------------------------------------------------------------------------------------ servers
def start_server(bundle: Path, backend: str, precision: str, work: Path, name: str,
                 threads: int | None = None) -> tuple[subprocess.Popen, str]:
    extra = serve_args(name) if backend == "torch" else []
    return served.start_server(bundle, "chat", backend, precision, work, name, extra=extra, cwd=ROOT,
                               env=server_env(name, threads))



async def _stream(stub, pb, text: str, n: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token, seconds to the end, token ids) of one streamed reply."""
    req = pb.ReplyRequest(text=text, model="chat", options=pb.GenerationOptions(max_new_tokens=n))
    t0 = time.perf_counter()
    first, ids = None, []
    async for msg in stub.Reply(req, timeout=600):
        if msg.HasField("delta"):
            if first is None:
                first = time.perf_counter() - t0
            ids.append(msg.delta.token_id)
    return first or 0.0, time.perf_counter() - t0, ids


class Served:
    def __init__(self, target: str):
        self.target = target

    async def run(self, case: str, prompts: list[str], n: int) -> dict[str, Any]:
        import grpc

        from chatforge.v1 import chatbot_pb2 as pb
        from chatforge.v1 import chatbot_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = pb_grpc.ChatbotStub(channel)
            await channel.channel_ready()
            if case == "1 stream":
                outs = [await _stream(stub, pb, p, n) for p in prompts]
                wall = sum(o[1] for o in outs)
            else:
                t0 = time.perf_counter()
                outs = await asyncio.gather(*(_stream(stub, pb, p, n) for p in prompts))
                wall = time.perf_counter() - t0
        return _result(outs, wall)


class Direct:
    """CTranslate2 called directly: one batch (``family.decode``: generate_batch or translate_batch) per prompt
    (1 stream) or of all prompts (concurrent)."""

    def __init__(self, model, prompts: dict[str, list[str]], family: Family, eos_id: int):
        self.model, self.tokens, self.family, self.eos_id = model, prompts, family, eos_id

    def _batch(self, texts: list[str], n: int) -> tuple[list[tuple[float, float, list[int]]], float]:
        firsts: dict[int, float] = {}
        t0 = time.perf_counter()

        def on_step(step) -> bool:
            firsts.setdefault(step.batch_id, time.perf_counter() - t0)
            return False

        res = self.family.decode(self.model, [self.tokens[t] for t in texts], n, end_token=[self.eos_id],
                                 callback=on_step)
        wall = time.perf_counter() - t0
        return [(firsts.get(i, wall), wall, ids) for i, ids in enumerate(res)], wall

    async def run(self, case: str, prompts: list[str], n: int) -> dict[str, Any]:
        if case == "1 stream":
            outs = [self._batch([p], n)[0][0] for p in prompts]
            return _result(outs, sum(o[1] for o in outs))
        outs, wall = self._batch(prompts, n)
        return _result(outs, wall)


def _result(outs: list[tuple[float, float, list[int]]], wall: float) -> dict[str, Any]:
    tokens = sum(len(o[2]) for o in outs)
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "ttft_ms": statistics.median(o[0] for o in outs) * 1e3, "ids": [o[2] for o in outs]}


# ------------------------------------------------------------------------------------------ report
def agreement(ids: dict[str, list[list[int]]], reference: str = REFERENCE) -> dict[str, dict[str, float]]:
    """Per engine against the reference: identical replies, and tokens before the first difference."""
    ref = ids.get(reference)
    out = {}
    for name, rows in ids.items():
        if name == reference or ref is None:
            continue
        same = prefix = total = 0
        for a, b in zip(ref, rows, strict=True):
            same += a == b
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            prefix, total = prefix + k, total + max(len(a), len(b))
        out[name] = {"identical_replies": round(same / len(ref), 4) if ref else 1.0,
                     "prefix_tokens": round(prefix / total, 4) if total else 1.0}
    return out


def summarize(runs: dict[str, dict[str, list[dict]]]) -> list[dict[str, Any]]:
    """One row per (engine, case): medians over the repetitions, the best, and every repetition's figures."""
    return served.summarize_runs(runs, "tokens_per_s", "ttft_ms")


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each served chatforge engine over each direct CTranslate2 anchor, per case: tokens/s (> 1: chatforge
    faster) and time to first token (anchor's / chatforge's: > 1 chatforge sooner)."""
    by = {(r["engine"], r["case"]): r for r in rows}
    out = []
    for case in CASES:
        for cf in dict.fromkeys(r["engine"] for r in rows if not is_anchor(r["engine"])):
            for an in dict.fromkeys(r["engine"] for r in rows if is_anchor(r["engine"])):
                c, a = by.get((cf, case)), by.get((an, case))
                if not c or not a or not a["tokens_per_s"] or not c["ttft_ms"]:
                    continue
                out.append({"case": case, "chatforge": cf, "anchor": an, **served.speed_ratio(c, a)})
    return out


def model_line(config: dict[str, Any]) -> str:
    return (f"Model: {config['model']}; {config['new_tokens']} new tokens per reply at most (greedy); prompts: "
            f"{config['prompts']}; {config['reps']} interleaved repetitions (median).")


def speed_table(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The report's table of engines: ``keys`` (e.g. engine, case), then tokens/s and time to first token."""
    return served.markdown_table(
        [*keys, "tokens/s (median)", "tokens/s (best)", "time to first token (ms)"],
        [[*(r[k] for k in keys), f"{r['tokens_per_s']:.1f}", f"{r['best_tokens_per_s']:.1f}", f"{r['ttft_ms']:.1f}"]
         for r in rows], len(keys))


def ratio_table(ratios: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The report's table of ratios (``served.speed_ratio``), after ``keys``."""
    return served.markdown_table(
        [*keys, "tokens/s (medians)", "tokens/s (best)", "time to first token"],
        [[*(r[k] for k in keys), f"{r['tokens_per_s']:.2f}x", f"{r['best_tokens_per_s']:.2f}x", f"{r['ttft']:.2f}x"]
         for r in ratios], len(keys))


def agreement_lines(agreement: dict[str, dict[str, float]], reference: str = REFERENCE) -> list[str]:
    return ["", f"Greedy agreement with {reference} (identical replies / tokens before the first difference):", "",
            *(f"- {name}: {a['identical_replies']:.0%} / {a['prefix_tokens']:.0%}" for name, a in agreement.items())]


def step_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each torch fp32 engine served with the scripted decoding step over the same engine with
    ``CHATFORGE_DECODE_STEP=eager`` (``<engine>-eager``), per case (> 1: the scripted step faster or sooner)."""
    by = {(r["engine"], r["case"]): r for r in rows}
    out = []
    for case in CASES:
        for eng in dict.fromkeys(r["engine"] for r in rows):
            scripted, eager = by.get((eng, case)), by.get((f"{eng}-eager", case))
            if scripted and eager and eager["tokens_per_s"] and scripted["ttft_ms"]:
                out.append({"case": case, "engine": eng, **served.speed_ratio(scripted, eager)})
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# {FAMILIES[result.get('family', 'gpt')].title} ({result['created']})", "",
             served.machine_line(result), "", model_line(result["config"]), "",
             *speed_table(result["rows"], ["engine", "case"]),
             "", "Ratios (chatforge served / CTranslate2 direct; > 1: chatforge faster or sooner):", "",
             *ratio_table(result["ratios"], ["case", "chatforge", "anchor"])]
    steps = step_ratios(result["rows"])
    if steps:
        lines += ["", "Scripted decoding step / eager (`CHATFORGE_DECODE_STEP=eager`), same server otherwise:", "",
                  *ratio_table(steps, ["case", "engine"])]
    lines += agreement_lines(result["agreement"])
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = list(dict.fromkeys(r["engine"] for r in result["rows"]))
    engines = [e for e in seen if not is_anchor(e)] + sorted(e for e in seen if is_anchor(e))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    by = {(r["engine"], r["case"]): r for r in result["rows"]}
    for ax, metric, label in ((axes[0], "tokens_per_s", "tokens/s"), (axes[1], "ttft_ms", "time to first token (ms)")):
        width = 0.38
        for k, case in enumerate(CASES):
            vals = [by.get((e, case), {}).get(metric, 0.0) for e in engines]
            n = result["config"].get("concurrent_streams")
            ax.bar([i + (k - 0.5) * width for i in range(len(engines))], vals, width,
                   label=f"{n} concurrent streams" if case == "concurrent" and n else case)
        ax.set_xticks(range(len(engines)), [e.replace("chatforge-", "cf-") for e in engines], rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.legend()
    what = {"gpt": "", "transformer": " Transformer"}[result.get("family", "gpt")]
    fig.suptitle(f"Served{what} generation (gRPC) vs CTranslate2 direct\n"  # the machine, as in the .md
                 + served.machine_line(result).replace("**", ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


lscpu_model = machine.lscpu_model


# ------------------------------------------------------------------------------------------ main
def model_inputs(gen, family: str, texts: list[str]) -> dict[str, list[str]]:
    """Each text's model input as the CTranslate2 backend builds it (its adapter for the family, from the
    generator's prompt encoding), as CTranslate2 token names."""
    from chatforge.serving.backend_ct2 import MODELS, _token_name

    adapter = MODELS[(family, "generation")](gen.model)
    return {t: [_token_name(i) for i in adapter.inputs(gen.encode_prompt(t)[0][: gen.max_input_tokens]
                                                        or [gen.tok.unk_id])[0]] for t in texts}


def trained_size(bundle: Path, size: Size) -> tuple[Size, str]:
    """``size`` with a trained bundle's shape (layers, width, heads, vocabulary, positions), and its description."""
    import yaml

    cfg = yaml.safe_load((bundle / "config.yaml").read_text(encoding="utf-8"))
    meta = json.loads((bundle / "metadata.json").read_text(encoding="utf-8"))
    m = cfg["model"]
    layers = m.get("n_layers") or m.get("num_decoder_layers")
    positions = m.get("n_positions") or m.get("max_len")
    size = size._replace(layers=layers, d_model=m["d_model"], heads=m["n_heads"],
                         vocab=meta["tokenizer"]["vocab_size"], positions=positions)
    return size, (f"trained bundle {bundle.name} ({cfg['name']}: {m['family']} {layers} layers, d_model "
                  f"{m['d_model']}, vocab {size.vocab}, {meta.get('metrics', {}).get('best_epoch', '?')} epochs), "
                  f"its own weights")


def run(out: Path, size: Size, reps: int | None = None, family: str = "gpt",
        anchor_threads: list[int] | None = None, server_threads: list[int] | None = None,
        bundle: Path | None = None, draft_tokens: int = 0, eager_step: bool = False) -> dict[str, Any]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `chatforge serve` sets it: idle pools sleep
    import ctranslate2

    from chatforge.bench.machine import cpus_available, is_loaded, load_average
    from chatforge.runtime import native_bf16, serving_threads
    from chatforge.serving.backend_ct2 import convert_bundle

    fam = FAMILIES[family]
    reps = reps or size.reps
    cpus = cpus_available()
    n_prompts = size.single_prompts + size.concurrent
    texts, corpus, source = prompts_and_corpus(n_prompts, bundle / "config.yaml" if bundle else fam.config)
    describe = fam.describe(size)
    if bundle is not None:
        size, describe = trained_size(bundle, size)
    load_before = load_average()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="served-generation-") as tmp:
        work = Path(tmp)
        if bundle is None:
            bundle = build_bundle(work / "bundle", size, corpus, fam)
        from chatforge.inference import load_model

        gen = load_model(bundle, "chat")
        prompt_tokens, eos_id, unk_id = model_inputs(gen, family, texts), gen.tok.eos_id, gen.tok.unk_id
        del gen
        ct2_dir = convert_bundle(bundle, work / "ct2", unk_id=unk_id)
        engines: dict[str, Any] = {}
        try:
            serving = served.with_thread_counts(served_engines(native_bf16(), draft_tokens, eager_step),
                                                server_threads)
            for name, (backend, precision, threads) in serving.items():
                proc, target = start_server(bundle, backend, precision, work, name, threads)
                procs.append(proc)
                engines[name] = Served(target)
            anchors = served.anchor_variants(ANCHORS, anchor_threads, cpus)
            for name, (ct, threads) in anchors.items():
                model = getattr(ctranslate2, fam.anchor)(str(ct2_dir), device="cpu", compute_type=ct,
                                                         intra_threads=threads, inter_threads=1)
                engines[name] = Direct(model, prompt_tokens, fam, eos_id)
            single, group = texts[: size.single_prompts], texts[size.single_prompts:]
            prompts = {"1 stream": single, "concurrent": group}
            runs = served.interleaved_runs(engines, CASES, prompts, size.new_tokens, reps)
        finally:
            served.stop_servers(procs)
    load_after = load_average()
    ids = served.last_outputs(runs, CASES, "ids")
    rows = summarize(runs)
    result: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": served.machine_record(load_before, load_after, ctranslate2=ctranslate2.__version__),
        "loaded": is_loaded([load_before, load_after], cpus),
        "family": family,
        "config": {"model": describe, "shape_of": fam.config.name, "draft_tokens": draft_tokens,
                   "eager_step": eager_step,
                   "new_tokens": size.new_tokens, "prompts": source, "single_prompts": size.single_prompts,
                   "concurrent_streams": size.concurrent, "reps": reps,
                   "served": {k: {"backend": b, "precision": p, "threads": t or f"default ({serving_threads()})"}
                              for k, (b, p, t) in serving.items()},
                   "anchors": {k: {"class": f"ctranslate2.{fam.anchor}", "compute_type": c,
                                   "intra_threads": t, "inter_threads": 1}
                               for k, (c, t) in anchors.items()}},
        "rows": rows, "ratios": ratios(rows), "agreement": agreement(ids),
        "raw": runs,
    }
    if result["loaded"]:
        result["note"] = "loaded: figures are ratios only"
    write(result, out)
    return result


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "served-generation.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (out / "served-generation.md").write_text(markdown(result))
    plot(result, out / "served-generation.png")


def rebuild(out: Path) -> dict[str, Any]:
    """Recompute the summary, ratios and report of ``out/served-generation.json`` from its raw repetitions."""
    result = json.loads((out / "served-generation.json").read_text())
    result["rows"] = summarize(result["raw"])
    result["ratios"] = ratios(result["rows"])
    write(result, out)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="gpt",
                    help="gpt: configs/gpt_chatbot_kr.yaml's shape; transformer: configs/chatbot_kr_transformer.yaml's")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default: the size's)")
    ap.add_argument("--rebuild", action="store_true", help="only rewrite the report from --out's JSON")
    ap.add_argument("--server-threads", type=int, nargs="+", default=None,
                    help="also serve every engine with these OMP_NUM_THREADS (named <engine>-<n>t)")
    ap.add_argument("--anchor-threads", type=int, nargs="+", default=None,
                    help="CTranslate2's intra_threads, one anchor per count (default: the CPUs available)")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="time this trained generation bundle (of --family) instead of random weights of the size's "
                         "shape; prompts are its config's test questions")
    ap.add_argument("--draft-tokens", type=int, default=0,
                    help="also serve the torch engines with speculative decoding (serve --draft-tokens N)")
    ap.add_argument("--single-prompts", type=int, default=None, help="prompts of the one-stream case")
    ap.add_argument("--eager-step", action="store_true",
                    help="also serve the torch fp32 and int8 engines with CHATFORGE_DECODE_STEP=eager (named "
                         "<engine>-eager)")
    args = ap.parse_args(argv)
    size = FAMILIES[args.family].sizes[args.size]
    if args.single_prompts:
        size = size._replace(single_prompts=args.single_prompts)
    result = rebuild(args.out) if args.rebuild else run(args.out, size, args.reps, args.family, args.anchor_threads,
                                                                  args.server_threads, args.bundle, args.draft_tokens,
                                                                  args.eager_step)
    print(markdown(result))


if __name__ == "__main__":
    main()
