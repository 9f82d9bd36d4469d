"""Served classification through the real gRPC server against ONNX Runtime called directly (issue 16).

Engines, every one on the same weights and texts:

* served (a ``chatforge serve`` process each, Classify over gRPC from this process with ``grpc.aio``):
  chatforge torch fp32, torch int8 (``--precision int8``), and the ONNX Runtime backend fp32 and int8
  (``--backend onnxruntime --precision fp32|int8``);
* anchors, in this process: ``onnxruntime.InferenceSession`` fp32 and int8 on the same export the backend
  makes (``serving.backend_ort.export_onnx`` / ``quantize_int8``), same thread settings, fed the same input
  tensors the served path builds (``chatforge.bundle.class_inputs``): one text per run (1 caller) and the 32
  texts of a group as one run (32 callers);
* the backend's ``OrtClassifier.classify`` called in this process (fp32, int8), per text and per group: what
  the served ORT path costs before gRPC and the micro-batcher (tokenization, input layout, softmax, oos policy).

Cases: 1 caller (the texts one after another: texts/s over the summed call times, median call latency)
and 32 concurrent callers (groups of 32 Classify calls at once, one text each, which the server's
micro-batcher gathers: texts/s over the wall time of the groups, median latency of a call). Repetitions are
interleaved across engines (the order rotates each repetition); a warm-up round is not timed.

Weights: ``configs/bert_clinc150.yaml``'s BERT (4 layers, d_model 256, 4 heads, SentencePiece vocabulary
trained on its CLINC150 training split, max_source_len 32) with random weights (initializer_range 0.2,
so argmaxes are not near-ties); texts are CLINC150 validation utterances (synthetic sentences when
``../shared/data`` is absent). Untrained weights do not change the work per text, which is what is timed;
argmax agreement with chatforge torch fp32 is reported beside (accuracy on real data:
benchmarks/ort_quality.py).

    nice -n 10 python benchmarks/served_classification.py --out benchmarks/results/served-classification [--size tiny]

Threads: ``--server-threads`` and ``--anchor-threads`` as in benchmarks/served_generation.py (servers at
``chatforge serve``'s own sizing plus ``<engine>-<n>t`` variants; the ONNX Runtime anchor at each count).

Writes ``served-classification.json`` and ``.md`` under ``--out``, with the CPU model (lscpu), the load
before and after, and whether the machine was loaded (then the figures are ratios only).
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
from pathlib import Path
from typing import Any, NamedTuple

from chatforge.bench import machine, served

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "bert_clinc150.yaml"


class Size(NamedTuple):  # not a dataclass: the tests load this file without registering it as a module
    layers: int
    d_model: int
    heads: int
    vocab: int
    single_texts: int  # texts one after another per repetition (the 1-caller case)
    callers: int  # concurrent callers (the concurrent case)
    groups: int  # groups of ``callers`` calls per repetition
    reps: int


SIZES = {
    "full": Size(layers=4, d_model=256, heads=4, vocab=4000, single_texts=48, callers=32, groups=4, reps=5),
    "tiny": Size(layers=1, d_model=32, heads=2, vocab=600, single_texts=3, callers=4, groups=1, reps=1),
}
# name -> (backend, precision) of a served engine
SERVED = {"chatforge-torch-fp32": ("torch", "fp32"), "chatforge-torch-int8": ("torch", "int8"),
          "chatforge-ort-fp32": ("onnxruntime", "fp32"), "chatforge-ort-int8": ("onnxruntime", "int8")}
ANCHORS = {"ort-direct-fp32": "fp32", "ort-direct-int8": "int8"}
# The served backend's classifier called in this process (no gRPC, no micro-batcher): where the gap between the
# served path and the direct anchor lies (tokenization and post-processing, or the server around it).
IN_PROCESS = {"ort-backend-inprocess-fp32": "fp32", "ort-backend-inprocess-int8": "int8"}
REFERENCE = "chatforge-torch-fp32"
CASES = ("1 caller", "32 callers")


# ------------------------------------------------------------------------------------------ inputs
def texts_and_corpus(n: int) -> tuple[list[str], list[str], str]:
    """(validation utterances, tokenizer training texts, where they came from)."""
    try:
        from chatforge.config import load_config
        from chatforge.training.run import load_splits

        train, valid, _, path = load_splits(load_config(CONFIG))
        if len(valid) >= n:
            return [e.text for e in valid[:: max(1, len(valid) // n)]][:n], [e.text for e in train], \
                f"CLINC150 val utterances ({path.name}, split of {CONFIG.name})"
    except Exception as e:  # noqa: BLE001 - the data set is optional: synthetic texts then
        print(f"CLINC150 unavailable ({type(e).__name__}: {e}); synthetic texts", file=sys.stderr)
    from chatforge.bench.cases import sample_texts

    corpus = sample_texts()
    return [corpus[i % len(corpus)] for i in range(n)], corpus, "synthetic (the packaged sample corpus)"


def build_bundle(out: Path, size: Size, corpus: list[str], labels: int = 151) -> Path:
    import torch

    from chatforge.bundle import build_from_config, save_bundle
    from chatforge.config import validate_config
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.train(corpus, vocab_size=size.vocab, on_vocab_too_large="lower")
    cfg = validate_config({"name": "served-classification", "data": {"path": "bench"}, "tracking": {"enabled": False},
                           "model": {"family": "bert", "task": "classification", "d_model": size.d_model,
                                     "n_heads": size.heads, "num_layers": size.layers, "d_ff": 4 * size.d_model,
                                     "dropout": 0.0, "max_len": 64, "initializer_range": 0.2},
                           "train": {"max_source_len": 32}}, source="served_classification")
    names = [f"intent{i}" for i in range(labels - 1)] + ["oos"]
    torch.manual_seed(0)
    return save_bundle(out, model=build_from_config(cfg, tok, names).eval(), tokenizer=tok, config=cfg, labels=names)


# ------------------------------------------------------------------------------------------ servers
def start_server(bundle: Path, backend: str, precision: str, work: Path, name: str,
                 extra: tuple[str, ...] = (), threads: int | None = None) -> tuple[subprocess.Popen, str]:
    return served.start_server(bundle, "intents", backend, precision, work, name, extra, cwd=ROOT,
                               env=served.thread_env(threads))


def is_anchor(engine: str) -> bool:
    return engine.startswith("ort-direct-")

async def _classify(stub, pb, text: str) -> tuple[float, str]:
    """(seconds, the best-scoring label) of one Classify call."""
    t0 = time.perf_counter()
    r = await stub.Classify(pb.ClassifyRequest(text=text, model="intents"), timeout=600)
    seconds = time.perf_counter() - t0
    scores = dict(r.scores)
    return seconds, max(scores, key=scores.__getitem__)


class Served:
    def __init__(self, target: str):
        self.target = target

    async def run(self, case: str, texts: list[str], callers: int) -> dict[str, Any]:
        import grpc

        from chatforge.v1 import chatbot_pb2 as pb
        from chatforge.v1 import chatbot_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = pb_grpc.ChatbotStub(channel)
            await channel.channel_ready()
            if case == "1 caller":
                outs = [await _classify(stub, pb, t) for t in texts]
                wall = sum(o[0] for o in outs)
            else:
                outs, wall = [], 0.0
                for i in range(0, len(texts), callers):
                    t0 = time.perf_counter()
                    outs += await asyncio.gather(*(_classify(stub, pb, t) for t in texts[i: i + callers]))
                    wall += time.perf_counter() - t0
        return _result(outs, wall)


class Direct:
    """ONNX Runtime called directly: one run per text (1 caller) or per group of texts (32 callers)."""

    def __init__(self, session, feeds: dict[tuple, dict], labels: list[str]):
        self.session, self.feeds, self.labels = session, feeds, labels  # feeds: texts -> that batch's numpy feed

    def _run(self, texts: list[str]) -> tuple[float, list[str]]:
        feed = self.feeds[tuple(texts)]
        t0 = time.perf_counter()
        logits = self.session.run(None, feed)[0]
        return time.perf_counter() - t0, [self.labels[int(i)] for i in logits.argmax(-1)]

    async def run(self, case: str, texts: list[str], callers: int) -> dict[str, Any]:
        outs: list[tuple[float, str]] = []
        wall = 0.0
        step = 1 if case == "1 caller" else callers
        for i in range(0, len(texts), step):
            seconds, best = self._run(texts[i: i + step])
            outs += [(seconds, b) for b in best]  # each caller of a group waits for the whole run
            wall += seconds
        return _result(outs, wall)


class InProcess:
    """``OrtClassifier.classify`` called in this process: one call per text (1 caller) or per group."""

    def __init__(self, classifier):
        self.classifier = classifier

    async def run(self, case: str, texts: list[str], callers: int) -> dict[str, Any]:
        outs: list[tuple[float, str]] = []
        wall = 0.0
        step = 1 if case == "1 caller" else callers
        for i in range(0, len(texts), step):
            t0 = time.perf_counter()
            preds = self.classifier.classify(texts[i: i + step])
            seconds = time.perf_counter() - t0
            outs += [(seconds, max(p.scores, key=p.scores.__getitem__)) for p in preds]
            wall += seconds
        return _result(outs, wall)


def _result(outs: list[tuple[float, str]], wall: float) -> dict[str, Any]:
    return {"texts": len(outs), "seconds": wall, "texts_per_s": len(outs) / wall if wall else 0.0,
            "latency_ms": statistics.median(o[0] for o in outs) * 1e3, "argmax": [o[1] for o in outs]}


# ------------------------------------------------------------------------------------------ report
def agreement(argmax: dict[str, list[str]], reference: str = REFERENCE) -> dict[str, float]:
    """Per engine: the share of texts whose best label equals the reference engine's."""
    ref = argmax.get(reference)
    if ref is None:
        return {}
    return {name: round(sum(a == b for a, b in zip(ref, rows, strict=True)) / len(ref), 4) if ref else 1.0
            for name, rows in argmax.items() if name != reference}


def summarize(runs: dict[str, dict[str, list[dict]]]) -> list[dict[str, Any]]:
    """One row per (engine, case): medians over the repetitions, the best, and every repetition's figures."""
    return served.summarize_runs(runs, "texts_per_s", "latency_ms")


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each served chatforge engine over each direct ONNX Runtime anchor, per case: texts/s (> 1: chatforge
    faster; medians and best repetitions)."""
    by = {(r["engine"], r["case"]): r for r in rows}
    out = []
    for case in CASES:
        for cf in dict.fromkeys(r["engine"] for r in rows if not is_anchor(r["engine"])):
            for an in dict.fromkeys(r["engine"] for r in rows if is_anchor(r["engine"])):
                c, a = by.get((cf, case)), by.get((an, case))
                if not c or not a or not a["texts_per_s"] or not a["best_texts_per_s"]:
                    continue
                out.append({"case": case, "chatforge": cf, "anchor": an,
                            "texts_per_s": round(c["texts_per_s"] / a["texts_per_s"], 3),
                            "best_texts_per_s": round(c["best_texts_per_s"] / a["best_texts_per_s"], 3)})
    return out


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"# Served classification vs ONNX Runtime ({result['created']})", "",
             served.machine_line(result), "",
             f"Model: {c['model']}; texts: {c['texts']}; {c['single_texts']} texts one by one, {c['groups']} "
             f"groups of {c['callers']} concurrent callers; {c['reps']} interleaved repetitions (median); servers' "
             f"--max-wait-ms: {c.get('server_max_wait_ms', 'the default')}.", "",
             *served.markdown_table(
                 ["engine", "case", "texts/s (median)", "texts/s (best)", "call latency (ms, median)"],
                 [[r["engine"], r["case"], f"{r['texts_per_s']:.1f}", f"{r['best_texts_per_s']:.1f}",
                   f"{r['latency_ms']:.2f}"] for r in result["rows"]], 2),
             "", "Ratios (chatforge served / ONNX Runtime direct, texts/s; > 1: chatforge faster):", "",
             *served.markdown_table(
                 ["case", "chatforge", "anchor", "medians", "best"],
                 [[r["case"], r["chatforge"], r["anchor"], f"{r['texts_per_s']:.2f}x", f"{r['best_texts_per_s']:.2f}x"]
                  for r in result["ratios"]], 3)]
    lines += ["", f"Argmax agreement with {REFERENCE}:", ""]
    lines += [f"- {name}: {a:.1%}" for name, a in result["agreement"].items()]
    return "\n".join(lines) + "\n"


lscpu_model = machine.lscpu_model


# ------------------------------------------------------------------------------------------ main
def run(out: Path, size: Size, reps: int | None = None, max_wait_ms: float | None = None,
        server_threads: list[int] | None = None, anchor_threads: list[int] | None = None) -> dict[str, Any]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `chatforge serve` sets it: idle pools sleep
    import onnxruntime as ort

    from chatforge.bench.machine import cpus_available, is_loaded, load_average
    from chatforge.bundle import class_inputs, load_bundle
    from chatforge.inference import load_model
    from chatforge.runtime import serving_threads
    from chatforge.serving import backend_ort

    reps = reps or size.reps
    cpus = cpus_available()
    texts, corpus, source = texts_and_corpus(size.single_texts + size.callers * size.groups)
    single, group = texts[: size.single_texts], texts[size.single_texts:]
    load_before = load_average()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="served-classification-") as tmp:
        work = Path(tmp)
        bundle = build_bundle(work / "bundle", size, corpus)
        clf = load_model(bundle, "intents")
        batches = [[t] for t in single] + [group[i: i + size.callers] for i in range(0, len(group), size.callers)]
        feeds = {tuple(b): {k: v.numpy() for k, v in class_inputs(clf.model, clf.tok, b, clf.max_input_tokens).items()}
                 for b in batches}
        # Exported as the backend exports: from the bundle's own model, not load_model's, whose fp32 linear layers
        # may be packed for oneDNN (on AMD CPUs), an op the ONNX exporter cannot trace.
        raw = load_bundle(bundle).model.eval()
        example = class_inputs(raw, clf.tok, ["a", "b c"], clf.max_input_tokens)
        fp32 = backend_ort.export_onnx(raw, example, work / "model.onnx")
        graphs = {"fp32": fp32, "int8": backend_ort.quantize_int8(fp32, work / "model-int8.onnx")}
        labels = clf.labels
        del clf
        engines: dict[str, Any] = {}
        try:
            serving = served.with_thread_counts(SERVED, server_threads)
            for name, (backend, precision, threads) in serving.items():
                extra = ("--max-wait-ms", str(max_wait_ms)) if max_wait_ms is not None else ()
                proc, target = start_server(bundle, backend, precision, work, name, extra, threads)
                procs.append(proc)
                engines[name] = Served(target)
            anchors = served.anchor_variants(ANCHORS, anchor_threads, cpus)
            for name, (p, threads) in anchors.items():
                sess = ort.InferenceSession(str(graphs[p]), backend_ort.session_options(threads),
                                            providers=["CPUExecutionProvider"])
                engines[name] = Direct(sess, feeds, labels)
            for name, p in IN_PROCESS.items():
                engines[name] = InProcess(backend_ort.OrtClassifier(bundle, "intents", precision=p, threads=cpus))
            prompts = {"1 caller": single, "32 callers": group}
            runs = served.interleaved_runs(engines, CASES, prompts, size.callers, reps)
        finally:
            served.stop_servers(procs)
    load_after = load_average()
    argmax = served.last_outputs(runs, CASES, "argmax")
    rows = summarize(runs)
    result: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": served.machine_record(load_before, load_after, onnxruntime=ort.__version__),
        "loaded": is_loaded([load_before, load_after], cpus),
        "config": {"model": f"BERT classifier {size.layers} layers, d_model {size.d_model}, {size.heads} heads, "
                            f"vocab {size.vocab} (SentencePiece), 151 labels, max_source_len 32, random weights",
                   "texts": source, "single_texts": size.single_texts, "callers": size.callers,
                   "groups": size.groups, "reps": reps,
                   "server_max_wait_ms": max_wait_ms if max_wait_ms is not None else "the default",
                   "served": {k: {"backend": b, "precision": p, "threads": t or f"default ({serving_threads()})"}
                              for k, (b, p, t) in serving.items()},
                   "anchors": {k: {"graph": p, "intra_op_threads": t, "inter_op_threads": 1, "spinning": False}
                               for k, (p, t) in anchors.items()},
                   "in_process": {k: {"backend": "onnxruntime", "precision": p} for k, p in IN_PROCESS.items()}},
        "rows": rows, "ratios": ratios(rows), "agreement": agreement(argmax),
        "raw": runs,
    }
    if result["loaded"]:
        result["note"] = "loaded: figures are ratios only"
    write(result, out)
    return result


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "served-classification.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (out / "served-classification.md").write_text(markdown(result))


def rebuild(out: Path) -> dict[str, Any]:
    """Recompute the summary, ratios and report of ``out/served-classification.json`` from its raw repetitions."""
    result = json.loads((out / "served-classification.json").read_text())
    result["rows"] = summarize(result["raw"])
    result["ratios"] = ratios(result["rows"])
    write(result, out)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default: the size's)")
    ap.add_argument("--rebuild", action="store_true", help="only rewrite the report from --out's JSON")
    ap.add_argument("--max-wait-ms", type=float, default=None,
                    help="the servers' --max-wait-ms (the Classify micro-batcher's window; default: serve's)")
    ap.add_argument("--server-threads", type=int, nargs="+", default=None,
                    help="also serve every engine with these OMP_NUM_THREADS (named <engine>-<n>t)")
    ap.add_argument("--anchor-threads", type=int, nargs="+", default=None,
                    help="ONNX Runtime's intra-op threads, one anchor per count (default: the CPUs available)")
    args = ap.parse_args(argv)
    result = rebuild(args.out) if args.rebuild else run(args.out, SIZES[args.size], args.reps, args.max_wait_ms,
                                                        args.server_threads, args.anchor_threads)
    print(markdown(result))


if __name__ == "__main__":
    main()
