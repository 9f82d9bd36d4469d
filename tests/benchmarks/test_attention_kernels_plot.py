"""benchmarks/attention_kernels.py's PNG names the load it was measured under and its bar labels do not overlap.

Drawn from the committed Zen 5 result (plotting only, nothing is timed).
"""

from __future__ import annotations

import json

import matplotlib
import pytest
from tests.benchmarks.conftest import ROOT, load

matplotlib.use("Agg")
RESULT = ROOT / "benchmarks" / "results" / "attention-kernels-amd-epyc-zen5" / "attention-kernels.json"


@pytest.fixture
def drawn(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved = []
    real = Figure.savefig

    def keep(self, *a, **k):
        saved.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    r = json.loads(RESULT.read_text())
    for loaded in (False, True):
        load("attention_kernels").plot({**r, "machine": {**r["machine"], "loaded": loaded}}, tmp_path / f"{loaded}.png")
    assert [p.read_bytes()[:4] for p in (tmp_path / "False.png", tmp_path / "True.png")] == [b"\x89PNG"] * 2
    return r, saved


def test_the_title_names_cpu_threads_and_load_and_a_loaded_run_says_so(drawn):
    r, (quiet, loaded) = drawn
    m = r["machine"]
    title = quiet._suptitle.get_text()
    assert m["lscpu_model"] in title and f"{m['threads']} threads" in title
    assert str(m["load_before"]) in title and str(m["load_after"]) in title
    assert "ratios only" not in title and "ratios only" in loaded._suptitle.get_text()


def test_the_bar_labels_do_not_overlap(drawn):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    _, (fig, _) = drawn
    renderer = FigureCanvasAgg(fig).get_renderer()  # pyplot.close left the figure without its Agg canvas
    bars = fig.axes[1]
    boxes = [t.get_window_extent(renderer) for t in bars.get_xticklabels()]
    assert len(boxes) > 1
    for a, b in zip(boxes, boxes[1:], strict=False):
        assert a.x1 <= b.x0, (a, b)
