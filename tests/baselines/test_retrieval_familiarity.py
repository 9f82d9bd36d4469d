"""The familiarity of a message to a selector's training questions (baselines.retrieval.familiarity): the score
behind the reply policy's ``min_familiarity`` guard."""

from __future__ import annotations

import math
import random
import re
import unicodedata

import pytest

from chatforge.baselines.retrieval import ResponseSelector, RetrievalConfig
from chatforge.baselines.retrieval.familiarity import UNSEEN_CHARACTERS, CharBigramModel
from chatforge.data import sample_corpus_path
from chatforge.data.readers import read_examples

SAMPLE, _ = read_examples(sample_corpus_path(), "chatbot_csv")
QUESTIONS = [e.text for e in SAMPLE]
ANSWERS = [e.response for e in SAMPLE]


def _reference_score(train: list[str], text: str, weight: float = 0.7) -> float:
    """The model written out from its definition, one character at a time, with no precomputed tables."""
    seqs = ["\x02" + t + "\x03" for t in train]
    chars = [c for s in seqs for c in s[1:]]
    pairs = [s[i:i + 2] for s in seqs for i in range(len(s) - 1)]
    s = "\x02" + text + "\x03"
    total = 0.0
    for i in range(1, len(s)):
        prev, cur = s[i - 1], s[i]
        p_uni = (chars.count(cur) + 0.5) / (len(chars) + 0.5 * UNSEEN_CHARACTERS)
        n_prev = sum(1 for p in pairs if p[0] == prev)
        p_bi = pairs.count(prev + cur) / n_prev if n_prev else 0.0
        total += math.log(weight * p_bi + (1 - weight) * p_uni)
    return total / (len(s) - 1)


def test_the_score_is_the_interpolated_bigram_model_written_out():
    train = ["오늘 날씨 어때", "날씨 좋다", "밥 먹었어?"]
    model = CharBigramModel(train)
    for text in ["날씨 어때", "밥 먹자", "zzz", "오", "날씨 좋다"]:
        assert model.score(text) == pytest.approx(_reference_score(train, text), rel=1e-12)
    assert CharBigramModel(train, weight=0.2).score("밥") == pytest.approx(_reference_score(train, "밥", 0.2))


def test_training_like_messages_score_above_other_languages_and_keyboard_mash():
    korean = [q for q in QUESTIONS if re.search("[\uac00-\ud7a3]", q)]  # the sample is Korean + English
    assert len(korean) >= 300
    model = CharBigramModel(korean)
    rng = random.Random(0)
    familiar = [model.score(q) for q in korean]
    mash = ["".join(rng.choice("qwertyuiopasdfghjkl ") for _ in range(12)) for _ in range(20)]
    syllables = ["".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(6)) for _ in range(20)]
    english = ["what is the weather like today", "how do I reset my password", "book a table for two"]
    worst_familiar = min(familiar)
    for text in mash + syllables + english:
        assert model.score(text) < worst_familiar, text
    assert all(math.isfinite(model.score(t)) and model.score(t) < 0 for t in mash + syllables)  # unseen: bounded


def test_decomposed_hangul_is_the_same_message_and_two_builds_agree():
    model = CharBigramModel(QUESTIONS)
    nfd = unicodedata.normalize("NFD", "안녕하세요")
    assert nfd != "안녕하세요" and model.score(nfd) == model.score("안녕하세요")
    assert CharBigramModel(QUESTIONS).score("오늘 뭐 해?") == model.score("오늘 뭐 해?")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="at least one training text"):
        CharBigramModel([])
    with pytest.raises(ValueError, match=r"weight=1.0 is out of range; allowed: \[0, 1\)"):
        CharBigramModel(["a"], weight=1.0)


TINY_ENCODER = dict(vocab_size=600, d_model=16, n_heads=2, num_layers=1, d_ff=32, epochs=1)


@pytest.mark.parametrize("encoder", ["tfidf", "ranker", "biencoder"])
def test_a_saved_selector_keeps_its_familiarity(encoder, tmp_path):
    cfg = RetrievalConfig(encoder=encoder, neighbours=3, ranker_folds=2, ranker_negatives=3, ranker_trees=5,
                          ranker_neighbours=(3,), ranker_reverse=3, ranker_shortlist=5,
                          **(TINY_ENCODER if encoder == "biencoder" else {}))
    sel = ResponseSelector(cfg).fit(QUESTIONS, ANSWERS)
    texts = ["안녕", "asdf qwer", "오늘 기분이 좋아"]
    before = sel.familiarity(texts)
    assert before == [CharBigramModel(sel.questions).score(t) for t in texts]
    assert before[1] < before[0]
    sel.save(tmp_path / "sel")
    assert ResponseSelector.load(tmp_path / "sel").familiarity(texts) == before
    with pytest.raises(TypeError, match="texts must be a sequence of strings"):
        sel.familiarity("안녕")
