"""PNG plots for evaluation reports (matplotlib, Agg backend: no display, safe in servers and CI).

Each function returns PNG bytes so the caller decides where (and how atomically) to write them.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence

import numpy as np

# Fonts with Hangul, tried after DejaVu Sans (matplotlib's default, no Hangul) for the glyphs it lacks, so Korean
# labels, titles and run names are drawn instead of empty boxes; the first installed ones are used.
HANGUL_FONTS = ("Noto Sans CJK KR", "Noto Sans KR", "Source Han Sans KR", "NanumGothic", "NanumBarunGothic",
                "Malgun Gothic", "Apple SD Gothic Neo", "AppleGothic", "UnDotum", "Baekmuk Gulim",
                "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC")


@functools.cache
def text_fonts() -> list[str]:
    """Font families for text in plots: DejaVu Sans, then the installed fonts of ``HANGUL_FONTS``."""
    # lazy: matplotlib takes seconds to import; only figures need it
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *(name for name in HANGUL_FONTS if name in installed)]


def _figure(figsize: tuple[float, float]):
    # Import lazily and use the object API with the Agg canvas: no global pyplot state,
    # so plotting from worker threads or while another backend is active is safe.
    # lazy: matplotlib takes seconds to import; only figures need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def most_confused_labels(cm: np.ndarray, labels: Sequence[str], top_k: int) -> list[int]:
    """Indices of the ``top_k`` labels with the most errors (off-diagonal mass in their row + column)."""
    cm = np.asarray(cm)
    off = cm - np.diag(np.diag(cm))
    involvement = off.sum(axis=0) + off.sum(axis=1)
    order = sorted(range(len(labels)), key=lambda i: (-int(involvement[i]), labels[i]))
    return order[:top_k]


def confusion_matrix_png(cm: Sequence[Sequence[int]], labels: Sequence[str], top_k: int = 25, title: str = "") -> bytes:
    """Confusion-matrix heat map of errors, restricted to the ``top_k`` most-confused labels.

    With 150 intents the full matrix is an unreadable 150x150 grid, so when there are more than
    ``top_k`` labels we plot only the sub-matrix of the labels most involved in errors (sorted by
    their error count), with counts written in the cells. Rows are true labels, columns predicted.
    """
    cm = np.asarray(cm, dtype=np.int64)
    k_all = len(labels)
    keep = list(range(k_all)) if k_all <= top_k else most_confused_labels(cm, labels, top_k)
    sub = cm[np.ix_(keep, keep)]
    names = [labels[i] for i in keep]
    k = len(keep)
    side = max(4.0, 0.35 * k + 2.5)
    fig = _figure((side + 1.0, side))
    ax = fig.add_subplot(1, 1, 1)
    # Colour only the errors: the diagonal (correct counts) would otherwise set the colour scale and
    # wash every confusion out to near-white. Correct counts are still written, in grey.
    errors = sub.copy()
    np.fill_diagonal(errors, 0)
    im = ax.imshow(errors, cmap="Reds", interpolation="nearest", vmin=0, vmax=max(1, int(errors.max())))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), names, rotation=90, fontsize=7, fontfamily=text_fonts())
    ax.set_yticks(range(k), names, fontsize=7, fontfamily=text_fonts())
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    subtitle = f"top {k} most-confused of {k_all} labels" if k < k_all else f"{k_all} labels"
    subtitle += "; colour = errors, grey = correct"
    ax.set_title(f"{title}\n{subtitle}" if title else subtitle, fontsize=9, fontfamily=text_fonts())
    if k <= 40:  # numbers stop being legible beyond that
        vmax = errors.max() if errors.size else 0
        for i in range(k):
            for j in range(k):
                if sub[i, j]:
                    color = "grey" if i == j else ("white" if sub[i, j] > vmax / 2 else "black")
                    ax.text(j, i, str(sub[i, j]), ha="center", va="center", fontsize=6, color=color)
    return _png(fig)


def confidence_histogram_png(hist: dict, title: str = "") -> bytes:
    """Side-by-side bars of correct vs wrong predictions per confidence bin (from ``confidence_histogram``)."""
    edges = np.asarray(hist["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = (edges[1] - edges[0]) * 0.4
    fig = _figure((6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(centers - width / 2, hist["correct"], width=width, label="correct", color="tab:green")
    ax.bar(centers + width / 2, hist["wrong"], width=width, label="wrong", color="tab:red")
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted label)")
    ax.set_ylabel("examples")
    ax.set_title(f"{title} (ECE {hist['ece']:.3f})" if title else f"ECE {hist['ece']:.3f}", fontsize=9,
                 fontfamily=text_fonts())
    ax.legend()
    return _png(fig)


def oos_tradeoff_png(curves: dict[str, tuple[Sequence[float], Sequence[float]]],
                     points: Sequence[tuple[str, float, float]] = (), goal: tuple[float, float] | None = None,
                     ylim: tuple[float, float] | None = None, title: str = "") -> bytes:
    """In-scope accuracy against OOS recall (both in %) as an out-of-scope threshold moves.

    ``curves``: name -> (in-scope accuracy, OOS recall) as fractions, e.g. from
    ``chatforge.oos.oos_tradeoff``; ``points``: single operating points (name, accuracy %, recall %)
    such as published results; ``goal``: (accuracy %, recall %) drawn as the corner of the region
    that meets both.
    """
    fig = _figure((7.5, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    for name, (acc, rec) in curves.items():
        acc, rec = np.asarray(acc, dtype=np.float64), np.asarray(rec, dtype=np.float64)
        if acc.shape != rec.shape:
            raise ValueError(f"curve {name!r}: accuracy and recall differ in length ({acc.shape} vs {rec.shape})")
        ax.step(100 * rec, 100 * acc, where="post", label=name, linewidth=1.6)
    for name, acc, rec in points:
        ax.plot([rec], [acc], marker="o", linestyle="none", label=name)
    if goal is not None:
        g_acc, g_rec = goal
        ax.axhline(g_acc, color="grey", linestyle="--", linewidth=0.8)
        ax.axvline(g_rec, color="grey", linestyle="--", linewidth=0.8)
        ax.fill_between([g_rec, 100], g_acc, 100, color="green", alpha=0.08, label="goal")
    ax.set_xlim(0, 100)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("OOS recall (%)")
    ax.set_ylabel("in-scope accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", prop={"size": 8, "family": text_fonts()})
    if title:
        ax.set_title(title, fontfamily=text_fonts())
    return _png(fig)
