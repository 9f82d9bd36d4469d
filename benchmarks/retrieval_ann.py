"""Does an ANN index pay for the response-selection pool? Exact matrix product vs FAISS (issue 17).

Pools of d-dimensional unit vectors, searched by inner product (= cosine) for the top k:

* ``real``: ChatbotData's pool, the deduplicated training answers (7,290 on the seed-0 5 % / 5 % split every
  ChatbotData config shares), encoded by a bi-encoder (``--bundle``: a saved ``encoder: biencoder`` bundle;
  without one, the shipped ``retrieval_chatbot_kr.yaml`` model trained for ``--real-epochs`` here and kept in
  ``OUT/biencoder-bundle`` for the next run); queries are the test questions, encoded by the same encoder.
* ``synthetic-N``: N seeded unit vectors of ``--dim`` dimensions around N/100 Gaussian centres (noise
  ``--noise`` times a centre's scale), queries drawn from the same mixture: embeddings of texts cluster by
  topic, and uniform noise would be the one geometry no index can exploit. The default noise, 2.25, was
  calibrated so that synthetic-10000's recall@10 at the default HNSW and IVF parameters is near the real
  pool's (noise 2.0: HNSW 0.99, IVF 0.88; 2.5: 0.97, 0.60; real pool: 0.98, 0.73); at 0.6 every index
  found every neighbour, which says nothing.

Variants: ``exact`` (``search.exact_topk``: the numpy matrix product and ``argpartition`` the selector uses),
FAISS ``flat`` (exact inner product, FAISS's own BLAS path: the reference), ``hnsw`` and ``ivf`` built with the
selector's default parameters (``search.SearchParams``) and searched at each ``--hnsw-ef-search`` /
``--ivf-nprobe`` value (``hnsw-ef128``, ``ivf-np16``: the config's defaults). Per pool and variant: build seconds, memory (the
pool matrix for exact; the serialised index, which is what the bundle stores and what FAISS holds), queries/s
at each batch size (top 10), its ratio to exact, and recall@1/@10/@50 against exact search. Each timing round
runs every variant once, in turn (interleaved, so a change in the machine's load lands on all), after one
untimed warm-up pass; the median over ``--repeats`` rounds is reported. ``lscpu``'s model name, the threads
numpy/FAISS use and the load average are recorded before and after.

With ``--end-to-end`` (real pool only), the whole ``ResponseSelector.select`` (neighbour term and TF-IDF scorer
included) with ``search: faiss`` (flat and HNSW) is compared with ``search: exact`` on the test questions:
top-1 agreement, recall@10 and milliseconds per message.

    nice -n 10 python benchmarks/retrieval_ann.py [--sizes 10000 100000] [--out runs/retrieval-ann]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("exact", "flat", "hnsw", "ivf")
RECALL_AT = (1, 10, 50)
TIMED_K = 10
# When an index "pays" (what search: auto's search_min_pool is set from): at least this much faster than exact at
# every batch size measured, while keeping at least this recall@10 against exact.
PAYS_SPEEDUP, PAYS_RECALL = 2.0, 0.95


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")


def blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]


def machine() -> dict:
    import faiss

    return {"lscpu_model_name": lscpu_model(), "logical_cpus": os.cpu_count(),
            "faiss_threads": faiss.omp_get_max_threads(), "blas_threads": blas_threads(),
            "faiss_version": faiss.__version__,
            "numpy_version": np.__version__, "load_average": [round(x, 2) for x in os.getloadavg()]}


def unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def synthetic(n: int, queries: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), dtype=np.float32)
        for s in range(0, m, 100_000):  # in chunks: a 1M x 128 float64 temporary would be 1 GB
            e = min(m, s + 100_000)
            out[s:e] = centres[rng.integers(0, len(centres), e - s)] + noise * rng.standard_normal((e - s, dim))
        return unit(out)

    return draw(n), draw(queries)


def real_pool(bundle: Path | None, out: Path, data: Path, epochs: int) -> tuple[np.ndarray, np.ndarray, Any, dict]:
    """The bi-encoder's pool vectors, the encoded test questions, the selector and its test split."""
    from chatforge.baselines.retrieval import ResponseSelector
    from chatforge.config import load_config
    from chatforge.data import read_examples
    from chatforge.data.splits import split_examples

    cfg = load_config(ROOT / "configs" / "retrieval_chatbot_kr.yaml")
    examples, _ = read_examples(data, "chatbot_csv")
    splits = split_examples(examples, cfg.data.valid_fraction, cfg.data.test_fraction, cfg.seed)
    if bundle is None:
        bundle = out / "biencoder-bundle"
        if not (bundle / "retrieval_meta.json").is_file():
            model_cfg = dataclasses.replace(cfg.model.family_config(), epochs=epochs)
            print(f"training the bi-encoder for {epochs} epoch(s) into {bundle} ...", flush=True)
            sel = ResponseSelector(model_cfg).fit([e.text for e in splits.train], [e.response for e in splits.train],
                                                 [e.text for e in splits.valid], [e.response for e in splits.valid])
            sel.save(bundle)
    sel = ResponseSelector.load(bundle)
    test = {"questions": [e.text for e in splits.test], "answers": [e.response for e in splits.test]}
    return np.ascontiguousarray(sel._pool_vecs), sel.encode(test["questions"]), sel, test


def build(variant: str, x: np.ndarray, params) -> tuple[Any, float, int]:
    """(searcher, build seconds, bytes held)."""
    from chatforge.baselines.retrieval.search import VectorSearch

    if variant == "exact":
        return VectorSearch(x, params), 0.0, x.nbytes
    p = dataclasses.replace(params, search="faiss", index=variant)
    t0 = time.perf_counter()
    s = VectorSearch.build(x, p)
    return s, time.perf_counter() - t0, len(s.to_bytes())


def recall(ids: np.ndarray, ref: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, ref, strict=True)]))


class Tuned:
    """One built index searched at one setting of its search-time knob (HNSW efSearch, IVF nprobe): the index is
    built once per kind, and each setting is a variant of its own."""

    def __init__(self, base, ef_search: int | None = None, nprobe: int | None = None) -> None:
        self.base, self.ef_search, self.nprobe = base, ef_search, nprobe

    def prepare(self) -> None:  # once before each pass, so no variant pays a per-call setattr
        if self.ef_search is not None:
            self.base.index.hnsw.efSearch = self.ef_search
        if self.nprobe is not None:
            self.base.index.nprobe = min(self.nprobe, self.base.index.nlist)

    def search(self, q: np.ndarray, k: int):
        return self.base.search(q, k)


def run_searches(searcher: Tuned, q: np.ndarray, batch: int) -> None:
    searcher.prepare()
    for s in range(0, len(q), batch):
        searcher.search(q[s : s + batch], TIMED_K)


def bench_pool(name: str, x: np.ndarray, q: np.ndarray, kinds, batches, repeats: int, params,
               ef_searches=(128,), nprobes=(16,)) -> dict:
    from chatforge.baselines.retrieval.search import exact_topk

    print(f"{name}: {len(x)} x {x.shape[1]}, {len(q)} queries", flush=True)
    k_ref = min(max(RECALL_AT), len(x))
    _, ref = exact_topk(q, x, k_ref)
    searchers, res = {}, {}
    for kind in kinds:
        base, seconds, nbytes = build(kind, x, params)
        if kind == "hnsw":
            named = {f"hnsw-ef{ef}": Tuned(base, ef_search=ef) for ef in ef_searches}
        elif kind == "ivf":
            named = {f"ivf-np{n}": Tuned(base, nprobe=n) for n in nprobes}
        else:
            named = {kind: Tuned(base)}
        for v, searcher in named.items():
            searcher.prepare()
            _, ids = searcher.search(q, k_ref)
            searchers[v] = searcher
            res[v] = {"build_s": round(seconds, 3), "memory_mb": round(nbytes / 2**20, 2),
                      **{f"recall@{k}": recall(ids, ref, k) for k in RECALL_AT if k <= k_ref}}
            if kind == "ivf":
                res[v]["nlist"], res[v]["nprobe"] = int(base.index.nlist), int(base.index.nprobe)
            print(f"  {v}: built in {seconds:.2f} s, {res[v]}", flush=True)
    variants = list(searchers)
    for b in batches:
        for v in variants:  # warm-up, not timed
            run_searches(searchers[v], q[: max(b, min(len(q), 4 * b))], b)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(repeats):
            for v in variants:  # interleaved: exact, flat, hnsw, ivf, exact, flat, ...
                t0 = time.perf_counter()
                run_searches(searchers[v], q, b)
                times[v].append(time.perf_counter() - t0)
        exact_qps = len(q) / statistics.median(times["exact"]) if "exact" in times else None
        for v in variants:
            qps = len(q) / statistics.median(times[v])
            res[v][f"batch{b}"] = {"seconds": [round(t, 5) for t in times[v]], "qps": round(qps, 1),
                                   "ratio_to_exact": round(qps / exact_qps, 2) if exact_qps else None}
        print(f"  batch {b}: " + ", ".join(f"{v} {res[v][f'batch{b}']['qps']:.0f} q/s" for v in variants), flush=True)
    return {"pool": name, "size": int(len(x)), "dim": int(x.shape[1]), "queries": int(len(q)), "variants": res}


def end_to_end(sel, test: dict, params, repeats: int) -> dict:
    """The whole select() (neighbour term and TF-IDF scorer included) with search: faiss, flat and HNSW at the
    defaults, against search: exact, on the test questions. ``flat`` returns exact results through the FAISS
    path (composite query, shortlist, exact re-scoring), so exact vs flat is what that path costs or saves and
    flat vs hnsw what the approximate index does."""
    qs = test["questions"]
    variants = {}
    for name, cfg in (("exact", dataclasses.replace(sel.config, search="exact")),
                      ("flat", dataclasses.replace(sel.config, search="faiss", search_index="flat")),
                      ("hnsw", dataclasses.replace(sel.config, search="faiss", search_index="hnsw",
                                                   search_hnsw_ef_search=params.hnsw_ef_search))):
        v = copy.copy(sel)
        v.config, v._search = cfg, None
        variants[name] = v
    out: dict[str, Any] = {"questions": len(qs), "variants": {}}
    got = {}
    for name, v in variants.items():
        t0 = time.perf_counter()
        v._searches()
        out["variants"][name] = {"build_s": round(time.perf_counter() - t0, 3)}
        got[name] = v.select(qs, 10)
    for name in variants:
        pairs = list(zip(got["exact"], got[name], strict=True))
        out["variants"][name]["top1_agreement"] = float(np.mean([e[0][0] == a[0][0] for e, a in pairs]))
        out["variants"][name]["recall@10"] = float(np.mean([len({x for x, _ in e} & {x for x, _ in a}) / len(e)
                                                            for e, a in pairs]))
    sample = qs[:100]
    for v in variants.values():  # warm-up
        v.select(sample[:5], 1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, v in variants.items():  # interleaved
            t0 = time.perf_counter()
            for question in sample:
                v.select([question], 1)
            times[name].append((time.perf_counter() - t0) / len(sample))
    for name in variants:
        out["variants"][name]["ms_per_message"] = round(1e3 * statistics.median(times[name]), 3)
    return out


def pays_from(results: list[dict], variant: str, batches: list[int]) -> int | None:
    """The smallest measured pool size from which ``variant`` pays at that size and every larger one measured."""
    rows = sorted(results, key=lambda r: r["size"])
    ok = [all(r["variants"][variant][f"batch{b}"]["ratio_to_exact"] >= PAYS_SPEEDUP for b in batches)
          and r["variants"][variant]["recall@10"] >= PAYS_RECALL for r in rows]
    for i, r in enumerate(rows):
        if all(ok[i:]):
            return r["size"]
    return None


def to_markdown(data: dict) -> str:
    m = data["machine_before"]
    lines = [f"# Retrieval search: exact vs FAISS ({data['date']})", "",
             f"Machine: {m['lscpu_model_name']}, {m['logical_cpus']} logical CPUs, FAISS threads "
             f"{m['faiss_threads']}, BLAS threads {m['blas_threads']}, load average {m['load_average']} before, "
             f"{data['machine_after']['load_average']} after. Top {TIMED_K} per query, median of "
             f"{data['args']['repeats']} interleaved rounds after a warm-up; recall against exact search. "
             f"FAISS parameters: {data['params']}.", ""]
    batches = data["args"]["batches"]
    head = "| pool | size | variant | build s | memory MB | " + " | ".join(
        f"q/s batch {b} | x exact" for b in batches) + " | R@1 | R@10 | R@50 |"
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in data["results"]:
        for v, x in r["variants"].items():
            cells = [r["pool"], f"{r['size']:,}", v, f"{x['build_s']:.2f}", f"{x['memory_mb']:.1f}"]
            for b in batches:
                cells += [f"{x[f'batch{b}']['qps']:,.0f}", f"{x[f'batch{b}']['ratio_to_exact']:.2f}"]
            cells += [f"{x.get(f'recall@{k}', float('nan')):.3f}" for k in RECALL_AT]
            lines.append("| " + " | ".join(cells) + " |")
    variants = list(data["results"][0]["variants"]) if data["results"] else []
    lines += ["", f"Pays (>= {PAYS_SPEEDUP:g}x exact's queries/s at every batch size, recall@10 >= {PAYS_RECALL:g}) from "
              "pool size: " + ", ".join(f"{v} {data['pays_from'].get(v) or 'never'}" for v in variants if v != "exact")
              + "."]
    e2e = data.get("end_to_end")
    if e2e:
        lines += ["", f"End to end: the real pool's `ResponseSelector.select` (neighbour term and TF-IDF scorer "
                      f"included) on {e2e['questions']} test questions, against search: exact; ms per message "
                      "over the first 100 questions, one at a time.", "",
                  "| search | pool + question index build s | top-1 agreement | recall@10 | ms per message |",
                  "| --- | --- | --- | --- | --- |"]
        for name, v in e2e["variants"].items():
            lines.append(f"| {name} | {v['build_s']:.2f} | {v['top1_agreement']:.3f} | {v['recall@10']:.3f} | "
                         f"{v['ms_per_message']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    """Queries/s per batch size and recall@10 against pool size: synthetic pools as lines, the real pool as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = data["args"]["batches"]
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5 * (len(batches) + 1), 4))
    synth = sorted((r for r in data["results"] if r["pool"] != "real"), key=lambda r: r["size"])
    real = [r for r in data["results"] if r["pool"] == "real"]
    variants = list(data["results"][0]["variants"])
    panels = [(f"batch {b}", "queries/s", lambda x, b=b: x[f"batch{b}"]["qps"], "log") for b in batches]
    panels.append(("recall@10", "recall@10 vs exact", lambda x: x["recall@10"], "linear"))
    for ax, (title, ylabel, get, yscale) in zip(axes, panels, strict=True):
        for i, v in enumerate(variants):
            colour = f"C{i}"
            if synth:
                ax.plot([r["size"] for r in synth], [get(r["variants"][v]) for r in synth], "o-", color=colour, label=v)
            for r in real:
                ax.plot([r["size"]], [get(r["variants"][v])], "*", color=colour, markersize=12,
                        label=None if synth else v)
        ax.set(xscale="log", yscale=yscale, xlabel="pool size (stars: real pool)", ylabel=ylabel, title=title)
        ax.legend(fontsize=7)
    mb, ma = data.get("machine_before", {}), data.get("machine_after", {})
    fig.suptitle(f"{mb.get('lscpu_model_name')}, {mb.get('logical_cpus')} CPUs, FAISS threads "
                 f"{mb.get('faiss_threads')}; load before {mb.get('load_average')}, after {ma.get('load_average')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    from chatforge.baselines.retrieval.search import SearchParams

    args.out.mkdir(parents=True, exist_ok=True)
    params = SearchParams(search="faiss", seed=args.seed)
    before = machine()
    results, e2e = [], None
    if args.real:
        x, q, sel, test = real_pool(args.bundle, args.out, args.data, args.real_epochs)
        results.append(bench_pool("real", x, q, args.variants, args.batches, args.repeats, params,
                                  args.hnsw_ef_search, args.ivf_nprobe))
        if args.end_to_end:
            e2e = end_to_end(sel, test, params, args.repeats)
            print(f"end to end: {e2e}", flush=True)
    for n in args.sizes:
        x, q = synthetic(n, args.queries, args.dim, args.noise, args.seed)
        results.append(bench_pool(f"synthetic-{n}", x, q, args.variants, args.batches, args.repeats, params,
                                  args.hnsw_ef_search, args.ivf_nprobe))
    data = {"benchmark": "retrieval_ann", "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "params": {k: v for k, v in dataclasses.asdict(params).items() if k not in ("search", "min_pool")},
            "machine_before": before, "machine_after": machine(), "results": results, "end_to_end": e2e}
    write(data, args.out, args.name)
    return data


def write(data: dict, out: Path, name: str) -> None:
    from chatforge.fileio import atomic_write_json, atomic_write_text

    data["pays_from"] = {v: pays_from(data["results"], v, data["args"]["batches"])
                         for v in (data["results"][0]["variants"] if data["results"] else []) if v != "exact"}
    atomic_write_json(out / f"{name}.json", data)
    atomic_write_text(out / f"{name}.md", to_markdown(data))
    plot(data, out / f"{name}.png")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 30_000, 100_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--noise", type=float, default=2.25)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--hnsw-ef-search", type=int, nargs="+", default=[128, 512],
                    help="HNSW efSearch values, one variant each (128: the config's default)")
    ap.add_argument("--ivf-nprobe", type=int, nargs="+", default=[16, 64],
                    help="IVF cells probed, one variant each (16: the config's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for BLAS (exact), FAISS and torch; 1 by default: on a shared machine a second "
                         "spinning OpenMP thread that gets descheduled makes batched timings noise")
    ap.add_argument("--real", action=argparse.BooleanOptionalAction, default=True,
                    help="include ChatbotData's pool (needs the data, and a bundle or a short training)")
    ap.add_argument("--bundle", type=Path, help="a saved encoder: biencoder bundle for the real pool")
    ap.add_argument("--real-epochs", type=int, default=2)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "chatbot_kr" / "ChatbotData.csv")
    ap.add_argument("--end-to-end", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "retrieval-ann")
    ap.add_argument("--name", default="retrieval-ann", help="file stem of the JSON/Markdown/PNG written to --out")
    ap.add_argument("--render", type=Path, help="only rewrite the Markdown and PNG (and pays_from) of this JSON")
    args = ap.parse_args(argv)
    if args.render:
        sys.path.insert(0, str(ROOT / "src"))
        data = json.loads(args.render.read_text(encoding="utf-8"))
        write(data, args.render.parent, args.render.stem)
        return data
    if "exact" not in args.variants:
        ap.error("--variants must include exact: ratios and recall are against it")
    sys.path.insert(0, str(ROOT / "src"))
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    old = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    try:
        with threadpool_limits(args.threads):  # numpy's BLAS: the exact path's matrix product
            data = run(args)
    finally:  # the process's settings, as they were (main() also runs inside the tests)
        faiss.omp_set_num_threads(old[0])
        torch.set_num_threads(old[1])
    print(f"wrote {args.out / args.name}.json/.md/.png", flush=True)
    return data


if __name__ == "__main__":
    main()
