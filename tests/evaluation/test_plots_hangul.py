"""Report plots draw Korean labels and titles in a font that has Hangul, when one is installed: before, every
plot used DejaVu Sans alone, so a Korean intent's name was a row of empty boxes in confusion_matrix.png (and each
syllable raised a 'Glyph ... missing from font(s) DejaVu Sans' warning) although Noto Sans CJK KR was installed."""

from __future__ import annotations

import warnings

import pytest

from chatforge.evaluation import plots

pytest.importorskip("matplotlib")


def _hangul_font_installed() -> bool:
    from matplotlib import font_manager

    return any(("CJK" in f.name or "Nanum" in f.name or f.name.endswith(" KR")) for f in font_manager.fontManager.ttflist)


@pytest.mark.skipif(not _hangul_font_installed(), reason="no font with Hangul installed on this machine")
def test_korean_labels_render_without_missing_glyphs():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = plots.confusion_matrix_png([[3, 1], [0, 4]], ["인사", "작별"], title="한국어 의도 (test)")
        png2 = plots.confidence_histogram_png({"edges": [0.0, 0.5, 1.0], "correct": [1, 6], "wrong": [1, 0],
                                               "ece": 0.1}, title="한국어")
    assert png.startswith(b"\x89PNG") and png2.startswith(b"\x89PNG")
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert not missing, missing[:3]
