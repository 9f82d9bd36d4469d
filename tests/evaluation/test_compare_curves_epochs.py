"""`chatforge compare --plot`: the epoch axis of the learning curves has whole-epoch ticks. Before, two epochs
were labelled 1.0, 1.2, 1.4, ... 2.0, epochs that do not exist."""

from __future__ import annotations

from tests.evaluation.test_compare import make_run

from chatforge.evaluation import compare


def test_epoch_ticks_are_whole(tmp_path, monkeypatch):
    make_run(tmp_path, "b-transformer", "transformer", 0.95, 0.30, 0.001)  # a two-epoch history
    from matplotlib.figure import Figure

    figures = []
    real = Figure.savefig

    def keep(self, *a, **kw):
        figures.append(self)
        return real(self, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    png = compare.learning_curves_png(compare.collect_runs(runs_dir=tmp_path))
    assert png.startswith(b"\x89PNG") and len(figures) == 1
    for ax in figures[0].axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
