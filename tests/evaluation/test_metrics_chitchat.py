"""Reply-quality and response-selection metrics (evaluation.metrics), against sacrebleu and by hand."""

from __future__ import annotations

import pytest
import sacrebleu

from chatforge.evaluation import metrics as M


def test_chrf_matches_sacrebleu_and_rewards_shared_characters():
    hyps, refs = ["오늘 날씨 좋네요", "밥 먹었어요"], ["오늘 날씨가 좋아요", "저녁 먹었어요"]
    assert M.corpus_chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert M.corpus_chrf(refs, refs) == pytest.approx(100.0)
    assert M.corpus_chrf(["가나다", "라마"], refs) < M.corpus_chrf(hyps, refs)


def test_repetition_rate_counts_runs_of_three_only():
    texts = ["좋아 좋아 좋아", "좋아 좋아 싫어 좋아", "a b c", "x x x x y"]
    assert M.repetition_rate(texts) == pytest.approx(2 / 4)
    assert M.repetition_rate(texts, run=2) == pytest.approx(3 / 4)
    assert M.repetition_rate([]) == 0.0
    with pytest.raises(ValueError, match="run must be"):
        M.repetition_rate(texts, run=1)


def test_identical_reply_rate_counts_replies_shared_by_different_inputs():
    sources = ["안녕", "반가워", "뭐해", "뭐해"]
    replies = ["안녕하세요", "안녕하세요", "쉬고 있어요", "쉬고 있어요"]
    # the first reply answers two different inputs (both count); the second answers one input twice
    assert M.identical_reply_rate(sources, replies) == pytest.approx(2 / 4)
    assert M.identical_reply_rate(["a", "b"], ["x", "y"]) == 0.0


def test_generation_quality_has_every_figure_and_char_units():
    q = M.generation_quality(["q1", "q2"], ["가나 가나 가나", "다라"], ["가나", "다라마"])
    assert set(q) == {"chrf", "bleu", "distinct_1", "distinct_2", "avg_length", "repeat_3_rate", "identical_rate"}
    assert q["avg_length"] == pytest.approx((8 + 2) / 2)  # characters, spaces included
    assert q["repeat_3_rate"] == pytest.approx(0.5)
    assert q["bleu"] == pytest.approx(sacrebleu.corpus_bleu(["가나 가나 가나", "다라"], [["가나", "다라마"]],
                                                            tokenize="char").score)


def test_selection_candidates_are_seeded_distinct_and_exclude_the_true_text():
    answers = [f"a{i % 30}" for i in range(60)]  # every text twice: duplicates are no distractors
    c1 = M.selection_candidates(answers, 10, seed=3)
    assert c1 == M.selection_candidates(answers, 10, seed=3)
    assert c1 != M.selection_candidates(answers, 10, seed=4)
    for a, cands in zip(answers, c1, strict=True):
        assert cands[0] == a and len(cands) == 10 and len(set(cands)) == 10 and a not in cands[1:]
    with pytest.raises(ValueError, match="at least 31 distinct"):
        M.selection_candidates(answers, 31, seed=0)


def test_true_rank_counts_ties_against_the_true_candidate_and_metrics_by_hand():
    assert M.true_rank([0.9, 0.1, 0.5]) == 0
    assert M.true_rank([0.5, 0.9, 0.5]) == 2
    m = M.selection_metrics([0, 1, 3, 0])
    assert m["r1"] == pytest.approx(0.5)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1) / 4)
    with pytest.raises(ValueError):
        M.selection_metrics([])
