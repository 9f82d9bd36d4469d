"""Where the benchmark scripts write: an untracked folder unless told to update the published results.

``benchmarks/results/`` holds the committed figures the README and ``docs/results/`` cite. Scripts that wrote there
by default dirtied the tree on every run and replaced the published figures with whatever the machine measured that
day; a run now writes under ``runs/bench/`` (ignored by git), ``--publish`` is the explicit way to replace the
committed file, and ``--out`` still names any path. Standard library only: some scripts set thread policies before
torch loads. The scripts import it as a sibling module (``benchmarks/`` is the script's folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = Path("benchmarks") / "results"
UNTRACKED = Path("runs") / "bench"


def add_output_options(ap: argparse.ArgumentParser, default: str) -> None:
    """``--out PATH`` or ``--publish`` (not both); ``default`` is the file (or folder) name, for the help."""
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--out", type=Path, default=None,
                       help=f"where to write (default: {UNTRACKED / default}, untracked)")
    group.add_argument("--publish", action="store_true",
                       help=f"write {PUBLISHED / default}, the committed results the docs cite (replaces them)")


def output_path(args: argparse.Namespace, name: str) -> Path:
    """``args.out`` when given; else ``benchmarks/results/<name>`` with ``--publish`` and ``runs/bench/<name>``
    without (both in the repository)."""
    if args.out is not None:
        return Path(args.out)
    return REPO / (PUBLISHED if args.publish else UNTRACKED) / name


def write_result(out: Path, result: dict) -> None:
    """Write ``result`` as JSON to ``out`` atomically (a temporary file, then a rename), then print the machine line
    (``result["machine"]``: ``cpu`` from ``chatforge.runtime.cpu_info()``, ``loadavg_start``/``loadavg_end``) and
    where it went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    m = result["machine"]
    print(f"{m['cpu']['model_name']}, {m['cpu']['available_cpus']} CPUs available; load "
          f"{[round(x, 2) for x in m['loadavg_start']]} -> {[round(x, 2) for x in m['loadavg_end']]}")
    print(f"wrote {out}")
