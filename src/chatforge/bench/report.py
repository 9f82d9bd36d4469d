"""``chatforge bench``'s report: ``bench.json``, ``bench.md`` (Markdown tables) and one PNG chart per case."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from chatforge.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

LOADED_NOTE = "loaded: figures are ratios only"


def _fmt(v: float) -> str:
    # three significant digits below 10, trailing zeros kept: 1.00 ms, not "1" (read as a count beside 1.36)
    return f"{v:,.1f}" if abs(v) >= 10 else f"{v:#.3g}"


def _engine_names(case: dict) -> list[str]:
    return [n for n, e in case["engines"].items() if e["status"] == "ok"]


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    flags = ", ".join(f for f, on in m["cpu"].get("flags", {}).items() if on) or "none"
    lines = [f"# chatforge bench ({'smoke' if result['smoke'] else 'full'}), {result['created']}", ""]
    if result["loaded"]:
        lines += [f"**{LOADED_NOTE}** (1-minute load above the {m['cpus_available']} CPUs available during the "
                  f"run: other processes shared the cores).", ""]
    if result.get("contended_note"):
        lines += [f"**{result['contended_note']}**", ""]
    lines += [f"CPU: {m['cpu'].get('model_name')} ({flags}); {m['cpus_available']} CPUs available, {m['threads']} "
              f"threads; load before {m['load_before']}, after {m['load_after']}; torch {m['versions'].get('torch')}, "
              + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if k != "torch" and v) + ".", "",
              "Ratios are chatforge / anchor speed: above 1 chatforge is faster (for times, anchor time / "
              "chatforge time). Every engine of a case ran the same weights on the same inputs, in interleaved "
              "repetitions after a warm-up; each figure is the median repetition.", ""]
    for name, case in result["cases"].items():
        lines.append(f"## {name}")
        lines.append("")
        if case["status"] != "ok":
            lines += [f"{case['status']}: {case['reason']}", ""]
            continue
        lines.append("; ".join(f"{k}: {v}" for k, v in case["config"].items()) + ".")
        peak = case.get("peak_rss_mb")
        lines.append(f"Peak RSS {peak} MiB; load {case['load_before']} -> {case['load_after']}"
                     + (f"; **{LOADED_NOTE}**" if case.get("loaded") else "") + ".")
        skipped = {n: e["reason"] for n, e in case["engines"].items() if e["status"] != "ok"}
        for n, why in skipped.items():
            lines.append(f"Engine {n} skipped: {why}.")
        lines.append("")
        engines = _engine_names(case)
        xcol = "x" if case["extra"].get("x") else "batch"  # scaling: batch, prompt length or d_model
        lines.append(f"| metric | {xcol} | " + " | ".join(engines) + " |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in engines) + " |")
        keyed: dict[tuple, dict[str, dict]] = {}
        for r in case["rows"]:
            keyed.setdefault((r["metric"], r["batch"]), {})[r["engine"]] = r
        for (metric, batch), by in keyed.items():
            unit = next(iter(by.values()))["unit"]
            label = metric if metric == unit else f"{metric} ({unit})"  # not "tokens/s (tokens/s)"
            lines.append(f"| {label} | {batch} | "
                         + " | ".join(_fmt(by[e]["value"]) if e in by else "–" for e in engines) + " |")
        lines.append("")
        if case["ratios"]:
            anchors = sorted({r["anchor"] for r in case["ratios"]}, key=engines.index)
            lines.append(f"| metric | {xcol} | chatforge engine | " + " | ".join(f"vs {a}" for a in anchors) + " |")
            lines.append("| --- | --- | --- | " + " | ".join("---" for _ in anchors) + " |")
            grouped: dict[tuple, dict[str, float]] = {}
            for r in case["ratios"]:
                grouped.setdefault((r["metric"], r["batch"], r["chatforge"]), {})[r["anchor"]] = r["ratio"]
            for (metric, batch, cf), by in grouped.items():
                lines.append(f"| {metric} | {batch} | {cf} | "
                             + " | ".join(f"{by[a]:.2f}x" if a in by else "–" for a in anchors) + " |")
            lines.append("")
        if case["agreement"]:
            lines += [f"Agreement: `{_compact(case['agreement'])}`", ""]
        if case["extra"]:
            lines += [f"Also: `{_compact(case['extra'])}`", ""]
    if result.get("left_out"):
        lines += ["## Not measured here", ""]
        lines += [f"- {k}: {v}" for k, v in result["left_out"].items()]
        lines.append("")
    return "\n".join(lines)


def _compact(obj: Any) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def machine_line(result: dict[str, Any]) -> str:
    """What a chart says about where it was measured: a PNG is often looked at without bench.md beside it.
    (Results written before 2026-12-04 name the CPU ``model``.)"""
    m = result["machine"]
    flags = ", ".join(f for f, on in m["cpu"].get("flags", {}).items() if on) or "none"
    line = (f"chatforge bench ({'smoke: tiny sizes, no timing claims' if result['smoke'] else 'full'}), "
            f"{result['created']}; CPU: {m['cpu'].get('model_name') or m['cpu'].get('model')} ({flags}); {m['cpus_available']} CPUs "
            f"available, {m['threads']} threads; load before {m['load_before']}, after {m['load_after']}")
    if result.get("loaded"):
        line += f"; {LOADED_NOTE}"
    if result.get("contended_note"):
        line += f"; {result['contended_note']}"
    return line


def _figure(case: dict, result: dict[str, Any]):
    """One panel per metric: a bar per engine and batch size (log scale when the values span 10x), with the
    machine it ran on (CPU, flags, threads, load; smoke and loaded runs say so) under the panels."""
    if case["status"] != "ok" or not case["rows"]:
        return None
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: seconds to import
    from matplotlib.figure import Figure

    metrics = list(dict.fromkeys(r["metric"] for r in case["rows"]))
    fig = Figure(figsize=(5.5 * len(metrics), 4), dpi=100)
    FigureCanvasAgg(fig)  # the object API with the Agg canvas: no pyplot global state
    xs = case["extra"].get("x")  # a curve per engine (scaling) instead of bars per batch
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        rows = [r for r in case["rows"] if r["metric"] == metric]
        # only the engines measured for this metric (classification: the BERT and the Transformer panels differ)
        engines = [e for e in _engine_names(case) if any(r["engine"] == e for r in rows)]
        better = " (higher is better)" if rows[0]["higher_is_better"] else " (lower is better)"
        ax.set_title(f"{case['name']}: {metric}{better}", fontsize=9)
        ax.set_ylabel(rows[0]["unit"])
        if xs:
            for e in engines:
                pts = sorted((r["batch"], r["value"]) for r in rows if r["engine"] == e)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=e)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xs.get(metric, "x"))
            ax.legend(fontsize=7)
            continue
        batches = list(dict.fromkeys(r["batch"] for r in rows))
        width = 0.8 / max(1, len(engines))
        for j, e in enumerate(engines):
            vals = [next((r["value"] for r in rows if r["engine"] == e and r["batch"] == b), 0) for b in batches]
            ax.bar([k + j * width for k in range(len(batches))], vals, width, label=e)
        ax.set_xticks([k + width * (len(engines) - 1) / 2 for k in range(len(batches))])
        ax.set_xticklabels([str(b) for b in batches])
        ax.set_xlabel("batch")
        values = [r["value"] for r in rows if r["value"] > 0]
        if values and max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    footer = textwrap.wrap(machine_line(result), width=90 * len(metrics))
    fig.tight_layout(rect=(0, 0.04 * len(footer) + 0.02, 1, 1))
    fig.text(0.01, 0.01, "\n".join(footer), fontsize=7, ha="left", va="bottom")
    return fig


def _chart(case: dict, result: dict[str, Any]) -> bytes | None:
    fig = _figure(case, result)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def write_report(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write bench.json, bench.md and <case>.png (atomically, each file whole or absent) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": atomic_write_json(out / "bench.json", result),
             "markdown": atomic_write_text(out / "bench.md", markdown(result))}
    for name, case in result["cases"].items():
        png = _chart(case, result)
        if png is not None:
            paths[name] = atomic_write_bytes(out / f"{name}.png", png)
    return paths
