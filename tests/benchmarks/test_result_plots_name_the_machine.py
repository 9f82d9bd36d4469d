"""The served_generation and train_linear PNGs name the CPU and the load they were measured under, as their .md do.

Drawn from committed results (plotting only, nothing is timed). served_generation's said only "loaded machine"
and its "concurrent" bars did not say how many streams; train_linear's gave no load.
"""

from __future__ import annotations

import json

import matplotlib
import pytest
from tests.benchmarks.conftest import ROOT, load

matplotlib.use("Agg")
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture
def titles(monkeypatch):
    from matplotlib.figure import Figure

    seen = []
    real = Figure.savefig

    def keep(self, *a, **k):
        seen.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    return seen


@pytest.mark.parametrize(("script", "result"), [
    ("served_generation", "served-generation-ct2runner/served-generation.json"),
    ("train_linear", "train-linear-amd-epyc-zen5/train-linear.json"),
])
def test_the_png_names_cpu_and_load(script, result, titles, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    r = json.loads((RESULTS / result).read_text())
    load(script).plot(r, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    (fig,) = titles
    title = fig._suptitle.get_text()
    m = r["machine"]
    loaded = r["loaded"] if "loaded" in r else m["loaded"]
    assert m["lscpu_model"] in title and str(m["load_before"]) in title and str(m["load_after"]) in title
    assert ("ratios only" in title) is loaded
    if script == "served_generation":
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert f"{r['config']['concurrent_streams']} concurrent streams" in legend


def test_the_retrieval_png_names_cpu_threads_and_load(titles, tmp_path):
    r = json.loads((RESULTS / "retrieval-ann.json").read_text())
    load("retrieval_ann").plot(r, tmp_path / "plot.png")
    (fig,) = titles
    title = fig._suptitle.get_text() if fig._suptitle else ""
    mb = r["machine_before"]
    assert mb["lscpu_model_name"] in title and f"FAISS threads {mb['faiss_threads']}" in title
    assert str(mb["load_average"]) in title and str(r["machine_after"]["load_average"]) in title
