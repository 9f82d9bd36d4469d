"""chatforge bench's PNGs say where they were measured, and each panel's legend names only what it plots.

A chart is looked at on its own (pasted in an issue, opened from the results folder), so the machine facts bench.md
opens with (CPU model and flags, CPUs and threads, load, smoke / loaded) are printed under the panels too.
"""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

from chatforge.bench import LOADED_NOTE, BenchOptions, machine, run_bench


@pytest.fixture(scope="module")
def charts(tmp_path_factory):
    """run_bench's figures, caught as they are saved (the PNG bytes hold no text to read back)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _run(tmp_path_factory.mktemp("h7-charts"), monkeypatch)


def _run(tmp_path, monkeypatch):
    import chatforge.bench as bench

    cpus = machine.cpus_available()
    monkeypatch.setattr(bench, "load_average", lambda: [cpus + 1.5, 1.0, 1.0])  # a loaded machine
    saved: list[Figure] = []
    real = Figure.savefig

    def keep(self, *a, **k):
        saved.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    result, paths = run_bench(BenchOptions(out=tmp_path, cases=["classification"], threads=1, repeats=1,
                                           smoke=True))
    assert result["cases"]["classification"]["status"] == "ok", result["cases"]["classification"]
    assert paths["classification"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(saved) == 1
    return result, saved[0]


def test_the_chart_names_the_machine_threads_load_and_that_it_is_a_smoke_run_on_a_loaded_machine(charts):
    result, fig = charts
    text = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    m = result["machine"]
    assert m["cpu"]["model_name"] in text
    for flag, on in m["cpu"]["flags"].items():
        assert (flag in text) is on, flag
    assert f"{m['threads']} threads" in text and f"{m['cpus_available']} CPUs" in text
    assert str(m["load_before"]) in text and str(m["load_after"]) in text
    assert "smoke" in text and LOADED_NOTE in text


def test_each_panel_has_axis_labels_and_its_legend_names_only_the_engines_it_plots(charts):
    result, fig = charts
    case = result["cases"]["classification"]
    assert len(fig.axes) == len({r["metric"] for r in case["rows"]})
    for ax in fig.axes:
        metric = ax.get_title().split(": ", 1)[1].rsplit(" (", 1)[0]
        rows = [r for r in case["rows"] if r["metric"] == metric]
        assert rows, ax.get_title()
        assert ax.get_xlabel() == "batch" and ax.get_ylabel() == rows[0]["unit"]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert sorted(legend) == sorted({r["engine"] for r in rows}), (metric, legend)


def test_a_committed_result_from_before_model_name_still_names_its_cpu():
    import json
    from pathlib import Path

    from chatforge.bench.report import machine_line

    committed = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "bench-2026-12-03" / "bench.json"
    result = json.loads(committed.read_text())
    assert "model_name" not in result["machine"]["cpu"]  # the schema this test is about
    assert f"CPU: {result['machine']['cpu']['model']} (" in machine_line(result)


def test_the_markdown_keeps_significant_zeros_and_does_not_repeat_a_unit(tmp_path):
    import json
    from pathlib import Path

    from chatforge.bench.report import markdown

    committed = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "bench-2026-12-03" / "bench.json"
    result = json.loads(committed.read_text())
    row = result["cases"]["generation"]["rows"][0]
    case = {**result["cases"]["generation"], "rows": [{**row, "metric": "time to first token", "unit": "ms",
                                                       "value": 1.0},
                                                      {**row, "metric": "tokens/s", "unit": "tokens/s"}]}
    md = markdown({**result, "cases": {"generation": case}})
    assert f"| time to first token (ms) | {row['batch']} | 1.00 |" in md
    assert "tokens/s (tokens/s)" not in md and f"| tokens/s | {row['batch']} |" in md
