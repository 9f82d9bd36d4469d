"""Helpers for benchmarks that time chatforge through real servers (benchmarks/served_generation.py,
benchmarks/served_classification.py): start a ``chatforge serve`` process and wait for its port, stop a set of
them, and run engines over cases in interleaved repetitions."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 300


def start_server(bundle: Path, model: str, backend: str, precision: str, work: Path, name: str,
                 extra: Sequence[str] = (), cwd: Path | None = None,
                 env: Mapping[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``chatforge serve --model MODEL=BUNDLE`` on a free 127.0.0.1 port -> (process, "127.0.0.1:PORT"), once the
    server has written its port file (it does so when SERVING); its output goes to ``work/NAME.log``. ``env``:
    variables set for the server on top of this process's (e.g. ``OMP_NUM_THREADS``)."""
    port_file = work / f"{name}.port"
    port_file.unlink(missing_ok=True)  # a stale file from an earlier server of that name would be read at once
    log = (work / f"{name}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatforge.cli", "serve", "--model", f"{model}={bundle}", "--backend", backend,
         "--precision", precision, "--port", "0", "--port-file", str(port_file), "--grace", "2",
         "--drain-delay", "0", *extra],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {}), "CHATFORGE_ENV": "test"}, cwd=cwd)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return proc, f"127.0.0.1:{port_file.read_text().strip()}"
        if proc.poll() is not None:
            raise SystemExit(f"server {name} exited: {(work / f'{name}.log').read_text()[-2000:]}")
        time.sleep(0.1)  # polling the file the server writes once SERVING, bounded by the deadline
    proc.kill()
    raise SystemExit(f"server {name} did not start in {START_TIMEOUT_S} s")


def with_thread_counts(engines: Mapping[str, tuple], threads: Sequence[int] | None) -> dict[str, tuple]:
    """name -> (*spec, threads) of served engines: each as ``chatforge serve`` sizes its pools (threads None: the
    CPUs available less one, ``runtime.serving_threads``), plus one per count in ``threads`` (set through
    ``OMP_NUM_THREADS``, see :func:`thread_env`) named ``<engine>-<n>t``, so one interleaved run compares them."""
    out = {k: (*spec, None) for k, spec in engines.items()}
    for t in threads or []:
        out.update({f"{k}-{t}t": (*spec, t) for k, spec in engines.items()})
    return out


def thread_env(threads: int | None) -> dict[str, str] | None:
    """The server environment for a thread count of :func:`with_thread_counts` (None: the server's own sizing)."""
    return {"OMP_NUM_THREADS": str(threads)} if threads else None


def anchor_variants(anchors: Mapping[str, Any], threads: Sequence[int] | None, cpus: int) -> dict[str, tuple[Any, int]]:
    """name -> (spec, threads) of direct anchors at each of ``threads`` (default: every available CPU). The one at
    ``cpus`` threads keeps its plain name, others get ``-<n>t``: a run can give the reference its best thread count,
    as the served engines get theirs."""
    return {(name if t == cpus else f"{name}-{t}t"): (spec, t) for t in (threads or [cpus]) for name, spec in anchors.items()}


def stop_servers(procs: Sequence[subprocess.Popen], timeout: float = 30) -> None:
    """SIGTERM every server, then wait for each (killing one that outlives ``timeout``)."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def interleaved_runs(engines: Mapping[str, Any], cases: Sequence[str], inputs: Mapping[str, Any], arg: Any,
                     reps: int) -> dict[str, dict[str, list[dict]]]:
    """``engines[e].run(case, inputs[case], arg)`` (a coroutine) for every engine and case, ``reps`` times after
    one warm-up round that is not kept; each repetition starts the engine order one place later, so no engine
    always runs first (or right after the same neighbour)."""
    runs: dict[str, dict[str, list[dict]]] = {e: {c: [] for c in cases} for e in engines}
    names = list(engines)
    for rep in range(-1, reps):  # -1: warm-up, not kept
        order = names[rep % len(names):] + names[: rep % len(names)] if rep >= 0 else names
        for e in order:
            for case in cases:
                r = asyncio.run(engines[e].run(case, inputs[case], arg))
                if rep >= 0:
                    runs[e][case].append(r)
        logger.info("repetition %d/%d done", rep + 1, reps)
    return runs


def speed_ratio(fast: Mapping[str, float], base: Mapping[str, float]) -> dict[str, float]:
    """``fast`` over ``base`` (summary rows with ``tokens_per_s``, ``best_tokens_per_s``, ``ttft_ms``): tokens/s on
    medians and on best repetitions (> 1: ``fast`` faster), and time to first token (> 1: ``fast`` sooner)."""
    return {"tokens_per_s": round(fast["tokens_per_s"] / base["tokens_per_s"], 3),
            "best_tokens_per_s": round(fast["best_tokens_per_s"] / base["best_tokens_per_s"], 3),
            "ttft": round(base["ttft_ms"] / fast["ttft_ms"], 3)}


def machine_line(result: Mapping[str, Any]) -> str:
    """The report line naming the CPU, the CPUs available and the load, flagged when the run was loaded."""
    m = result["machine"]
    return (f"CPU: {m['lscpu_model']}; CPUs available {m['cpu'].get('available_cpus')}; load before {m['load_before']}, "
            f"after {m['load_after']}" + (" — **loaded: figures are ratios only**" if result["loaded"] else ""))


# ------------------------------------------------------------------ what the scripts' reports share
THREAD_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "KMP_BLOCKTIME")


def last_outputs(runs: dict[str, dict[str, list[dict]]], cases: Sequence[str], key: str) -> dict[str, list]:
    """Each engine's outputs (``key``: token ids, argmaxes) of its last repetition, cases in order; ``key`` is then
    removed from every repetition's record, so the JSON keeps the timings only."""
    out = {e: [x for case in cases for x in runs[e][case][-1][key]] for e in runs}
    for by_case in runs.values():
        for case in cases:
            for record in by_case[case]:
                record.pop(key, None)
    return out


def machine_record(load_before: Any, load_after: Any, **extra: Any) -> dict[str, Any]:
    """A report's ``machine``: ``lscpu``'s model, the CPU flags that matter, the load before and after, the thread
    variables in effect, and ``extra`` (library versions)."""
    from chatforge.bench.machine import cpu_info, lscpu_model

    return {"lscpu_model": lscpu_model(), "cpu": cpu_info(), "load_before": load_before, "load_after": load_after,
            **extra, "env": {k: os.environ.get(k) for k in THREAD_ENV}}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int) -> list[str]:
    """A Markdown table's lines; ``rows`` hold formatted cells, columns from ``numeric_from`` on align right."""
    align = ["---"] * numeric_from + ["---:"] * (len(header) - numeric_from)
    return [f"| {' | '.join(header)} |", f"|{'|'.join(align)}|", *(f"| {' | '.join(map(str, r))} |" for r in rows)]


def summarize_runs(runs: dict[str, dict[str, list[dict]]], rate: str, time_key: str) -> list[dict[str, Any]]:
    """One row per (engine, case): the medians of ``rate`` (e.g. tokens_per_s) and ``time_key`` (ttft_ms) over the
    repetitions, the best ``rate`` (on a shared machine a neighbour only ever slows a run down), and every
    repetition's figures."""
    import statistics

    rows = []
    for engine, cases in runs.items():
        for case, reps in cases.items():
            rows.append({"engine": engine, "case": case,
                         rate: round(statistics.median(r[rate] for r in reps), 2),
                         time_key: round(statistics.median(r[time_key] for r in reps), 3),
                         f"best_{rate}": round(max(r[rate] for r in reps), 2),
                         f"reps_{rate}": [round(r[rate], 2) for r in reps],
                         f"reps_{time_key}": [round(r[time_key], 3) for r in reps]})
    return rows
