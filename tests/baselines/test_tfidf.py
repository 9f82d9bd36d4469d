"""TF-IDF features shared by the estimator baselines: scikit-learn's word + char_wb vectorizers side by
side, a JSON round trip that reproduces the features bit for bit, and clear errors at the edges."""

import json
import unicodedata

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.feature_extraction.text import TfidfVectorizer

from chatforge.baselines.tfidf import TfidfConfig, TfidfFeatures, check_texts, read_saved_meta

TEXTS = ["the cat sat", "the dog sat down", "a cat and a dog", "안녕하세요 반가워요"]


def test_features_are_word_then_char_wb_tfidf_side_by_side():
    cfg = TfidfConfig(word_ngram_max=2, char_ngram_min=2, char_ngram_max=3)
    feats = TfidfFeatures.from_config(cfg)
    x = feats.fit_transform(TEXTS)
    word = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, dtype=np.float32).fit_transform(TEXTS)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 3), sublinear_tf=True,
                           dtype=np.float32).fit_transform(TEXTS)
    assert x.dtype == np.float32 and x.shape == (4, word.shape[1] + char.shape[1]) == (4, feats.n_features)
    np.testing.assert_array_equal(x.toarray(), np.hstack([word.toarray(), char.toarray()]))


def test_json_round_trip_gives_identical_features():
    feats = TfidfFeatures.from_config(TfidfConfig())
    feats.fit_transform(TEXTS)
    again = TfidfFeatures.from_json(json.loads(json.dumps(feats.to_json())))
    new = ["the cat and the dog", "반가워요"]
    np.testing.assert_array_equal(again.transform(new).toarray(), feats.transform(new).toarray())


def test_config_refuses_an_empty_char_range_and_unknown_keys():
    with pytest.raises(ValidationError, match=r"char_ngram_min \(6\) must be <= char_ngram_max \(5\)"):
        TfidfConfig(char_ngram_min=6, char_ngram_max=5)
    with pytest.raises(ValidationError, match="ngram_max"):
        TfidfConfig(ngram_max=3)


def test_check_texts_names_the_slip():
    assert check_texts(("a", "b"), "texts") == ["a", "b"]
    with pytest.raises(TypeError, match="texts must be a sequence of strings, not a single string"):
        check_texts("hello", "texts")
    with pytest.raises(TypeError, match="item 1 is int"):
        check_texts(["a", 3], "texts")


def test_read_saved_meta_names_missing_files_and_wrong_versions(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved linear model: missing meta.json, weights.npz"):
        read_saved_meta(tmp_path, ["meta.json", "weights.npz"], "meta.json", 1, "linear model")
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 2}))
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="format_version 2; this chatforge reads version 1"):
        read_saved_meta(tmp_path, ["meta.json", "weights.npz"], "meta.json", 1, "linear model")
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 1, "k": "v"}))
    assert read_saved_meta(tmp_path, ["meta.json"], "meta.json", 1, "linear model")["k"] == "v"


def test_check_texts_composes_decomposed_hangul():
    nfd = unicodedata.normalize("NFD", "결혼하면 좋을까")
    assert len(nfd) > len("결혼하면 좋을까")  # decomposed: letters, not syllables
    assert check_texts([nfd, "cafe\u0301", "plain"], "texts") == ["결혼하면 좋을까", "café", "plain"]


def test_estimator_baselines_answer_decomposed_korean_as_composed():
    """Before: a TF-IDF selector and classifier scored an NFD message on letters no training text had."""
    from chatforge.baselines.retrieval import ResponseSelector, RetrievalConfig
    from chatforge.baselines.xgboost import XGBoostConfig, XGBoostTextClassifier

    questions = ["오늘 날씨 어때", "비가 와", "배고파", "밥 먹고 싶다", "졸려", "잠이 와", "헤어졌어", "이별했어"]
    answers = ["맑아요.", "우산 챙기세요.", "맛있는 거 드세요.", "맛있는 거 드세요.", "일찍 주무세요.", "일찍 주무세요.",
               "많이 힘드시겠어요.", "많이 힘드시겠어요."]
    selector = ResponseSelector(RetrievalConfig(encoder="tfidf", neighbours=3)).fit(questions, answers)
    classifier = XGBoostTextClassifier(XGBoostConfig(n_estimators=20, max_depth=3)).fit(
        questions, ["weather", "weather", "food", "food", "sleep", "sleep", "love", "love"])
    for text in ("밥 먹고 싶어", "잠이 와요", "헤어졌어요"):
        nfd = unicodedata.normalize("NFD", text)
        assert selector.reply(nfd) == selector.reply(text)
        np.testing.assert_array_equal(classifier.predict_proba([nfd]), classifier.predict_proba([text]))
    assert selector.reply(unicodedata.normalize("NFD", "밥 먹고 싶어"))[0] == "맛있는 거 드세요."
