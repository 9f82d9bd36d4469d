"""``chatforge bench``: chatforge against its anchors (HF transformers, CTranslate2, ONNX Runtime, HF tokenizers)."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from chatforge.cli._shared import _fail, _flag, app, console, err_console

# Kept here (not imported from chatforge.bench) so `--help` does not import torch.
BENCH_CASES = ("generation", "seq2seq", "classification", "tokenizer", "training", "scaling")


@app.command("bench")
def bench(
    smoke: bool = _flag(False, "--smoke/--no-smoke",
                        help="Tiny sizes and one repetition: checks that it runs and writes its report (CI)."),
    out: Path | None = typer.Option(None, "--out", help="Report folder (default runs/bench/<UTC timestamp>)."),
    cases: list[str] = typer.Option(list(BENCH_CASES), "--cases", metavar="CASE[,CASE...]",
                                    help=f"Cases to run (repeatable or comma-separated): {', '.join(BENCH_CASES)}."),
    threads: int | None = typer.Option(None, "--threads", help="Threads for every engine (default: the CPUs "
                                                                 "available to this process)."),
    repeats: int | None = typer.Option(None, "--repeats",
                                       help="Timed repetitions per engine (default 3; 1 with --smoke)."),
    contend: int = typer.Option(0, "--contend", help="Busy-looping processes to run beside the whole run: the "
                                                     "contended case of a shared machine (0 = none)."),
):
    """Run chatforge and each anchor on identical weights and inputs; write bench.json, bench.md and PNGs."""
    # Accept --cases a,b as well as --cases a --cases b.
    chosen = [c.strip() for item in cases for c in item.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in BENCH_CASES]
    if unknown or not chosen:
        _fail(f"--cases {', '.join(unknown) or '(empty)'} is unknown; allowed: {', '.join(BENCH_CASES)}")
    if threads is not None and threads < 1:
        _fail(f"--threads {threads} is out of range; allowed: an integer >= 1 (at most the CPUs available)")
    if repeats is not None and repeats < 1:
        _fail(f"--repeats {repeats} is out of range; allowed: an integer >= 1")

    from chatforge.bench import BenchError, BenchOptions, run_bench
    from chatforge.bench.machine import cpus_available

    out = out or Path("runs") / "bench" / _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    opts = BenchOptions(out=out, cases=chosen, threads=threads or cpus_available(),
                        repeats=repeats or (1 if smoke else 3), smoke=smoke, contend=contend)
    progress = Progress(SpinnerColumn(), TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console)
    try:
        with progress:
            task = progress.add_task("starting", total=len(chosen))
            result, paths = run_bench(
                opts, progress=lambda msg: progress.update(task, description=msg),
                on_case_done=lambda name, case: progress.update(task, advance=1,
                                                                description=f"{name}: {case['status']}"))
    except BenchError as e:
        _fail(str(e))
    _render(result)
    console.print(f"wrote [bold]{paths['json'].parent}[/] ({', '.join(p.name for p in paths.values())})",
                  highlight=False)


def _render(result: dict) -> None:
    if result.get("loaded"):
        console.print(f"[yellow]{result['note']}[/] (load {result['machine']['load_before']} -> "
                      f"{result['machine']['load_after']} on {result['machine']['cpus_available']} CPUs)")
    table = Table(title="chatforge / anchor speed (above 1: chatforge faster)")
    for col in ("case", "metric", "batch", "chatforge", "vs anchors"):
        table.add_column(col, justify="right" if col == "batch" else "left")
    for name, case in result["cases"].items():
        if case["status"] != "ok":
            table.add_row(name, f"[yellow]{case['status']}[/]: {case['reason']}", "", "", "")
            continue
        grouped: dict[tuple, list[str]] = {}
        for r in case["ratios"]:
            grouped.setdefault((r["metric"], r["batch"], r["chatforge"]), []).append(f"{r['anchor']} {r['ratio']:.2f}x")
        for (metric, batch, cf), ratios in grouped.items():
            table.add_row(name, metric, str(batch), cf, ", ".join(ratios))
    console.print(table)
