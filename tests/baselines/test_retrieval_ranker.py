"""The retrieval family's learned ranker (encoder ranker): its features, cross-fitting, ranking, config, bundle."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from sklearn.preprocessing import normalize

from chatforge.baselines.retrieval import ResponseSelector, RetrievalConfig
from chatforge.baselines.retrieval.ranker import FeatureIndex, cross_fit_features, pair_features
from chatforge.config import validate_config
from chatforge.data import read_examples, sample_corpus_path
from chatforge.evaluation.metrics import selection_report
from chatforge.inference import load_model
from chatforge.training.run import run_experiment

PAIRS = [
    ("오늘 날씨 어때", "맑고 화창해요.", "0"), ("날씨 좋다", "맑고 화창해요.", "0"), ("비 온대", "우산 챙기세요.", "0"),
    ("비가 와", "우산 챙기세요.", "0"), ("배고파", "맛있는 거 드세요.", "0"), ("밥 먹고 싶다", "맛있는 거 드세요.", "0"),
    ("헤어졌어", "많이 힘드시겠어요.", "1"), ("이별했어", "많이 힘드시겠어요.", "1"), ("썸 타는 중", "설레겠어요.", "2"),
]
Q, A, L = ([p[i] for p in PAIRS] for i in range(3))
CFG = RetrievalConfig(encoder="ranker", word_ngram_max=1, char_ngram_min=1, char_ngram_max=3,
                      ranker_neighbours=(1, 3), ranker_reverse=2, ranker_folds=3, ranker_negatives=3)


def _col(index, name):
    return index.feature_names(CFG.ranker_neighbours).index(name)


def test_features_match_their_definitions_computed_by_hand():
    index = FeatureIndex.fit(Q, A, L, CFG)
    question, cands = "비 오네", ["우산 챙기세요.", "맛있는 거 드세요.", "처음 보는 답이에요."]
    x = pair_features(index, [question], [cands], CFG.ranker_neighbours, CFG.ranker_reverse,
                      CFG.neighbour_temperature)
    assert x.shape == (3, len(index.feature_names(CFG.ranker_neighbours)))
    vec = index.features.vectorizers["char"]
    qv, cv, tq = (normalize(vec.transform(t)) for t in ([question], cands, index.questions))
    cos_qc = (qv @ cv.T).toarray()[0]
    cos_qq = (qv @ tq.T).toarray()[0]
    np.testing.assert_allclose(x[:, _col(index, "char_qa")], cos_qc, rtol=1e-5, atol=1e-6)
    # exact: the nearest training question whose answer is exactly the candidate; 0 for an unseen answer
    by_answer = [max(cos_qq[i] for i, a in enumerate(A) if a == c) if c in A else 0.0 for c in cands]
    np.testing.assert_allclose(x[:, _col(index, "char_exact")], by_answer, rtol=1e-5, atol=1e-6)
    # nb1: similarity of the candidate to the answer of the single nearest training question
    nearest_answer = normalize(vec.transform([A[int(np.argmax(cos_qq))]]))
    np.testing.assert_allclose(x[:, _col(index, "char_nb1")], (cv @ nearest_answer.T).toarray()[:, 0],
                               rtol=1e-5, atol=1e-6)
    assert x[:, _col(index, "in_pool")].tolist() == [1.0, 1.0, 0.0]
    assert x[:, _col(index, "log_count")].tolist() == pytest.approx([math.log(3), math.log(3), 0.0])
    assert x[:, _col(index, "length")].tolist() == [len(c) for c in cands]
    assert len(set(x[:, _col(index, "char_top1")])) == 1  # one value per list
    # label agreement: the question's neighbours say label 0, as do the first two candidates' pairs
    assert x[0, _col(index, "label_agree")] > 0.9 and x[1, _col(index, "label_agree")] > 0.9


def test_features_without_labels_drop_the_label_columns():
    index = FeatureIndex.fit(Q, A, None, CFG)
    assert "label_agree" not in index.feature_names(CFG.ranker_neighbours)
    x = pair_features(index, ["배고파요"], [A[:3]], CFG.ranker_neighbours, CFG.ranker_reverse, 0.05)
    assert x.shape == (3, len(index.feature_names(CFG.ranker_neighbours)))


def test_cross_fitting_never_lets_a_question_find_its_own_pair():
    # Every answer belongs to one question only: an index that held the question itself would give its true
    # answer exact = 1 (the question is its own nearest neighbour) and in_pool = 1; cross-fitted, both are 0.
    questions = [f"질문 {i} 번" for i in range(30)] + ["질문 0 번"]  # a repeated question text: one fold
    answers = [f"대답 {i} 이에요" for i in range(30)] + ["다른 대답이에요"]
    x, y, groups, folds = cross_fit_features(questions, answers, None, CFG)
    index = FeatureIndex.fit(questions, answers, None, CFG)
    starts = np.r_[0, np.cumsum(groups)][:-1]
    assert y[starts].tolist() == [1.0] * len(starts) and y.sum() == len(starts)
    assert len(starts) == len(set(zip(questions, answers, strict=True)))
    assert x[starts, _col(index, "char_exact")].max() == 0.0
    assert x[starts, _col(index, "in_pool")].max() == 0.0
    assert set(folds.tolist()) == set(range(CFG.ranker_folds))
    # the same lists scored against an index of every pair (no cross-fitting) leak the answer
    leaky = pair_features(index, questions[:1], [[answers[0], answers[1]]], CFG.ranker_neighbours,
                          CFG.ranker_reverse, 0.05)
    assert leaky[0, _col(index, "char_exact")] == pytest.approx(1.0)


def _sample_split():
    examples, _ = read_examples(sample_corpus_path())
    rng = np.random.default_rng(0)
    held = set(rng.choice(len(examples), size=len(examples) // 5, replace=False).tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    test = [e for i, e in enumerate(examples) if i in held]
    return train, test


@pytest.mark.parametrize("ranker", ["xgboost", "logistic"])
def test_ranker_ranks_held_out_answers_far_above_chance_and_round_trips(tmp_path, ranker):
    train, test = _sample_split()
    cfg = RetrievalConfig(encoder="ranker", ranker=ranker, ranker_trees=30, ranker_negatives=5,
                          ranker_neighbours=(3, 10))
    sel = ResponseSelector(cfg).fit([e.text for e in train], [e.response for e in train],
                                    labels=[e.label for e in train])
    tq, ta = [e.text for e in test], [e.response for e in test]
    got = selection_report(sel.score, tq, ta, seed=7, sizes=(10,))
    constant = selection_report(lambda qs, cs: [np.zeros(len(c)) for c in cs], tq, ta, seed=7, sizes=(10,))
    assert constant["r1_of_10"] == 0.0  # ties count against the true answer
    assert got["r1_of_10"] > 0.5 and got["mrr_of_10"] > 0.6  # chance: 0.1 / 0.29
    assert sel.history[0]["ranker"] == ranker and sel.history[0]["lists"] > 0
    top = sel.select(tq[:4], 3)
    assert all(len(r) == 3 and r[0][1] >= r[1][1] >= r[2][1] and 0.0 < r[0][1] < 1.0 for r in top)
    assert all(reply in sel.pool for r in top for reply, _ in r)
    sel.save(tmp_path)
    back = ResponseSelector.load(tmp_path)
    assert back.select(tq[:4], 3) == top
    np.testing.assert_allclose(np.concatenate(back.score(tq[:3], [ta[:3]] * 3)),
                               np.concatenate(sel.score(tq[:3], [ta[:3]] * 3)), rtol=1e-6)
    (tmp_path / "ranker.json").unlink()
    with pytest.raises(FileNotFoundError, match="ranker.json"):
        ResponseSelector.load(tmp_path)


def test_select_covers_top_k_beyond_the_shortlist():
    sel = ResponseSelector(dataclasses.replace(CFG, ranker_shortlist=1, ranker_trees=5)).fit(Q, A, labels=L)
    assert len(sel.select(["비 와"], 5)[0]) == 5  # every pool answer, though the shortlist is 1 per signal


@pytest.mark.parametrize(("key", "value", "match"), [
    ("ranker", "svm", "ranker"),
    ("ranker_neighbours", [], "ranker_neighbours"),
    ("ranker_neighbours", [5, 0], "ranker_neighbours"),
    ("ranker_folds", 1, "ranker_folds"),
    ("ranker_trees_count", 10, "ranker_trees_count"),
])
def test_config_rejects_bad_ranker_keys_by_name(key, value, match):
    with pytest.raises(Exception, match=match):
        validate_config({"name": "x", "model": {"family": "retrieval", "task": "selection", "encoder": "ranker",
                                                key: value}})


def test_shipped_ranker_config_validates():
    from chatforge.config import load_config

    cfg = load_config("configs/retrieval_chatbot_kr_ranker.yaml")
    assert cfg.model.encoder == "ranker" and list(cfg.model.ranker_neighbours) == [5, 20, 50]


def test_ranker_bundle_from_a_selection_run_serves_through_load_model(tmp_path):
    cfg = validate_config({
        "name": "ranker", "seed": 0,
        "data": {"path": "sample", "format": "chatbot_csv", "valid_fraction": 0.1, "test_fraction": 0.2},
        "model": {"family": "retrieval", "task": "selection", "encoder": "ranker", "ranker_trees": 20,
                  "ranker_negatives": 5, "ranker_neighbours": [3, 10]},
        "tracking": {"enabled": False},
    })
    res = run_experiment(cfg, run_dir=tmp_path / "run")
    assert res.metrics["test_r1_of_10"] > 0.5
    served = load_model(res.bundle_dir, "ranker")
    reply, score = served.select("배고파")
    assert (reply, score) == ResponseSelector.load(res.bundle_dir).reply("배고파")
    assert reply in served.model.pool and 0.0 < score < 1.0
    # the sample's labels reached the label features through the run
    assert "label_agree" in res.metrics["history"][0]["features"]


def test_pmi_table_holds_positive_pmi_of_bigram_pairs_seen_twice():
    from chatforge.baselines.retrieval.ranker import PmiTable

    qs = ["배고파", "배고파요", "졸려", "졸려요", "심심해"]
    ans = ["밥 드세요", "밥 드세요", "자요", "자요", "놀아요"]
    t = PmiTable.fit(qs, ans)
    q, a = t.question_vocab["배고"], t.answer_vocab["드세"]
    # "배고" in 2 of 5 questions, "드세" in 2 of 5 answers, together twice: log(2 * 5 / (2 * 2))
    assert t.matrix[q, a] == pytest.approx(math.log(2 * 5 / 4))
    assert "심심" not in t.question_vocab  # seen once: dropped
    s, nq, nc = t.scores(["배고파"], ["밥 드세요", "자요"])
    assert s[0, 0] > 0.0 and s[0, 1] == 0.0 and nc[1] == len(t.answer_vec.build_analyzer()("자요"))


def test_ranker_without_pmi_has_no_pmi_columns_and_needs_no_pmi_files(tmp_path):
    sel = ResponseSelector(dataclasses.replace(CFG, ranker_pmi=False, ranker_trees=5)).fit(Q, A, labels=L)
    assert "pmi_sum" not in sel.history[0]["features"]
    sel.save(tmp_path)
    assert not (tmp_path / "pmi.safetensors").exists()
    assert ResponseSelector.load(tmp_path).select(["비 와"], 2) == sel.select(["비 와"], 2)
    with_pmi = ResponseSelector(dataclasses.replace(CFG, ranker_trees=5)).fit(Q, A, labels=L)
    assert {"pmi_sum", "pmi_mean"} <= set(with_pmi.history[0]["features"])


# -- learned question->answer signals: hashed n-gram pair logistic regression, label classifiers --------------

SIGNALS = dataclasses.replace(CFG, ranker_pair_lr=True, ranker_pair_lr_bits=16, ranker_pair_lr_epochs=20,
                              ranker_label_model=True, ranker_trees=5)


def test_pair_lr_scores_are_the_margin_over_the_hashed_pairs_and_learn_the_pairing():
    from chatforge.baselines.retrieval.ranker import PairLogistic

    qs = ["배고파", "배고파요", "밥 먹고 싶다", "졸려", "졸려요", "피곤해", "심심해", "심심하다"]
    ans = ["밥 드세요"] * 3 + ["자요"] * 3 + ["놀아요"] * 2
    m = PairLogistic.fit(qs, ans, negatives=3, epochs=20, bits=16)
    cands = ["밥 드세요", "자요", "놀아요", "처음 보는 답"]
    got = m.scores(["배고파", "졸려요"], cands, [np.arange(4), np.array([1, 0])])
    assert got.shape == (6,)
    # by hand: sum of w[hash(g, h)] over the question's and candidate's n-grams, / sqrt(|q| |c| + 1), + bias
    qa, ca = m.question_vec.build_analyzer(), m.answer_vec.build_analyzer()
    va = len(m.answer_vocab)

    def margin(q, c):
        g = sorted({m.question_vocab[t] for t in qa(q) if t in m.question_vocab})
        h = sorted({m.answer_vocab[t] for t in ca(c) if t in m.answer_vocab})
        total = sum(m.weights[(i * va + j) % (1 << 16)] for i in g for j in h)
        return total / math.sqrt(len(g) * len(h) + 1.0) + m.intercept

    want = [margin("배고파", c) for c in cands] + [margin("졸려요", "자요"), margin("졸려요", "밥 드세요")]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert got[0] > max(got[1], got[2]) and got[4] > got[5]  # learned: hungry -> eat, sleepy -> sleep


def test_label_model_agreement_reads_the_candidates_own_words_and_survives_a_missing_label():
    index = FeatureIndex.fit(Q, A, L, SIGNALS)
    assert index.label_model is not None and index.feature_names(CFG.ranker_neighbours)[-1] == "label_model_agree"
    char = index.features.vectorizers["char"]
    agree = index.label_model.agreement(normalize(char.transform(["헤어졌어요"])),
                                        normalize(char.transform(["많이 힘드시겠어요.", "맑고 화창해요."])))
    assert agree.shape == (1, 2) and agree[0, 0] > agree[0, 1] and (agree <= 1.0 + 1e-6).all()
    # a fold can miss a label: its classifier gives that label ~0 and keeps the columns of every label
    two = FeatureIndex.fit(Q[:6] + Q[8:], A[:6] + A[8:], L[:6] + L[8:], SIGNALS, ["0", "1", "2"])
    p = two.label_model._proba(normalize(two.features.vectorizers["char"].transform(["헤어졌어"])), two.label_model.question_coef,
                               two.label_model.question_bias)
    assert p.shape == (1, 3) and p[0, 1] < 1e-6
    no_labels = FeatureIndex.fit(Q, A, None, SIGNALS)
    assert no_labels.label_model is None and "label_model_agree" not in no_labels.feature_names(CFG.ranker_neighbours)


def test_cross_fitting_trains_each_folds_pair_lr_and_label_model_without_the_lists_it_scores(monkeypatch):
    from chatforge.baselines.retrieval import ranker

    scored = []
    real = ranker.pair_features

    def spy(index, questions, candidates, *args):
        scored.append((index, list(questions)))
        return real(index, questions, candidates, *args)

    monkeypatch.setattr(ranker, "pair_features", spy)
    questions = [f"질문 {i} 번" for i in range(30)]
    answers = [f"대답 {i % 10} 이에요" for i in range(30)]
    labels = [str(i % 3) for i in range(30)]
    x, y, groups, folds = ranker.cross_fit_features(questions, answers, labels, SIGNALS)
    assert len(scored) == SIGNALS.ranker_folds
    for index, held in scored:
        # the signals of the index that scores a fold's lists were fitted on that index's pairs only
        assert index.pair_lr is not None and index.label_model is not None
        assert set(index.pair_lr.question_vocab) <= {t for q in index.questions
                                                     for t in index.pair_lr.question_vec.build_analyzer()(q)}
        assert not set(held) & set(index.questions)
    names = scored[0][0].feature_names(SIGNALS.ranker_neighbours)
    assert x.shape[1] == len(names) and "pair_lr" in names and names[-1] == "label_model_agree"


def test_ranker_with_learned_signals_round_trips_and_names_a_missing_file(tmp_path):
    sel = ResponseSelector(SIGNALS).fit(Q, A, labels=L)
    assert {"pair_lr", "label_model_agree"} <= set(sel.history[0]["features"])
    sel.save(tmp_path)
    back = ResponseSelector.load(tmp_path)
    assert back.select(["비 와", "배고파요"], 3) == sel.select(["비 와", "배고파요"], 3)
    np.testing.assert_allclose(np.concatenate(back.score(["배고파요"], [A[:5]])),
                               np.concatenate(sel.score(["배고파요"], [A[:5]])), rtol=1e-6)
    for name in ("pair_lr.safetensors", "label_model.safetensors"):
        (tmp_path / name).rename(tmp_path / "kept")
        with pytest.raises(FileNotFoundError, match=name):
            ResponseSelector.load(tmp_path)
        (tmp_path / "kept").rename(tmp_path / name)


@pytest.mark.parametrize(("key", "value", "match"), [
    ("ranker_pair_lr_ngram", [3, 2], "ranker_pair_lr_ngram"),
    ("ranker_pair_lr_ngram", [0, 2], "ranker_pair_lr_ngram"),
    ("ranker_pair_lr_bits", 30, "ranker_pair_lr_bits"),
    ("ranker_pair_lr_negatives", 0, "ranker_pair_lr_negatives"),
    ("ranker_label_model", "maybe", "ranker_label_model"),
])
def test_config_rejects_bad_signal_keys_by_name(key, value, match):
    with pytest.raises(Exception, match=match):
        validate_config({"name": "x", "model": {"family": "retrieval", "task": "selection", "encoder": "ranker",
                                                key: value}})


def test_ranker_with_learned_signals_serves_through_load_model(tmp_path):
    cfg = validate_config({
        "name": "ranker", "seed": 0,
        "data": {"path": "sample", "format": "chatbot_csv", "valid_fraction": 0.1, "test_fraction": 0.2},
        "model": {"family": "retrieval", "task": "selection", "encoder": "ranker", "ranker_trees": 20,
                  "ranker_negatives": 5, "ranker_neighbours": [3, 10], "ranker_pair_lr": True,
                  "ranker_pair_lr_bits": 16, "ranker_label_model": True},
        "tracking": {"enabled": False},
    })
    res = run_experiment(cfg, run_dir=tmp_path / "run")
    assert {"pair_lr", "label_model_agree"} <= set(res.metrics["history"][0]["features"])
    assert res.metrics["test_r1_of_10"] > 0.5
    served = load_model(res.bundle_dir, "ranker")
    reply, score = served.select("배고파")
    assert (reply, score) == ResponseSelector.load(res.bundle_dir).reply("배고파")
    assert reply in served.model.pool and 0.0 < score < 1.0


ENCODER = dataclasses.replace(CFG, ranker_encoder="polyencoder", poly_codes=2, vocab_size=60, d_model=16, n_heads=2,
                              num_layers=1, d_ff=32, dropout=0.0, epochs=2, batch_size=8, neighbours=2)


def test_encoder_feature_is_the_score_of_an_encoder_trained_on_the_folds_index_only(monkeypatch):
    from chatforge.baselines.retrieval import PolyEncoder, ResponseSelector, ranker

    scored = []
    real = ranker.pair_features

    def spy(index, questions, candidates, *args):
        x = real(index, questions, candidates, *args)
        scored.append((index, list(questions), x, index.encoder.score(questions, candidates)))
        return x

    monkeypatch.setattr(ranker, "pair_features", spy)
    questions = [f"질문 {i} 번" for i in range(30)]
    answers = [f"대답 {i % 10} 이에요" for i in range(30)]
    with pytest.raises(ValueError, match="ranker_encoder needs make_encoder"):
        ranker.FeatureIndex.fit(questions, answers, None, ENCODER)
    x, *_ = ranker.cross_fit_features(questions, answers, None, ENCODER, ResponseSelector)
    assert len(scored) == ENCODER.ranker_folds
    col = scored[0][0].feature_names(ENCODER.ranker_neighbours).index("encoder")
    for index, held, xf, expected in scored:
        enc = index.encoder
        assert isinstance(enc._net, PolyEncoder) and enc.config.tfidf_weight == 0.0
        assert enc.questions == index.questions and not set(held) & set(enc.questions)  # never saw the fold
        np.testing.assert_allclose(xf[:, col], np.concatenate(expected), rtol=1e-6)
    assert x.shape[1] == len(scored[0][0].feature_names(ENCODER.ranker_neighbours))


def test_ranker_with_the_encoder_feature_round_trips(tmp_path):
    sel = ResponseSelector(ENCODER).fit(Q, A, labels=L)
    assert "encoder" in sel.history[0]["features"]
    sel.save(tmp_path)
    assert (tmp_path / "ranker_encoder" / "encoder.safetensors").is_file()
    back = ResponseSelector.load(tmp_path)
    np.testing.assert_array_equal(np.concatenate(back.score(["배고파요"], [A[:5]])),
                                  np.concatenate(sel.score(["배고파요"], [A[:5]])))
    assert back.select(["비 와", "배고파요"], 3) == sel.select(["비 와", "배고파요"], 3)
    without = ResponseSelector(CFG).fit(Q, A, labels=L)
    assert "encoder" not in without.history[0]["features"]
    without.save(tmp_path / "plain")
    assert not (tmp_path / "plain" / "ranker_encoder").exists()


def test_pool_candidates_reuse_the_index_rows_and_give_the_same_features():
    """select's candidates are pool answers: pair_features(reuse_pool=True) takes their TF-IDF rows and reverse
    neighbours from the index (FeatureIndex.reverse_neighbours) instead of computing them again. The features
    must be the very same numbers as the general path's, and a list with any answer outside the pool must keep
    the general path."""
    train, test = _sample_split()
    index = FeatureIndex.fit([e.text for e in train], [e.response for e in train], [e.label for e in train], CFG)
    pool = index.pool
    rng = np.random.default_rng(0)
    questions = [e.text for e in test[:12]]
    lists = [[pool[int(j)] for j in rng.choice(len(pool), size=7, replace=False)] for _ in questions]
    args = (CFG.ranker_neighbours, CFG.ranker_reverse, CFG.neighbour_temperature)
    fast = pair_features(index, questions, lists, *args, reuse_pool=True)
    general = pair_features(index, questions, lists, *args)
    assert np.array_equal(fast, general)
    assert set(index._reverse) == {("char", CFG.ranker_reverse), ("word", CFG.ranker_reverse)}  # the fast path ran
    top, sims = index.reverse_neighbours("char", CFG.ranker_reverse)
    assert top.shape == sims.shape == (len(pool), CFG.ranker_reverse)
    # the nearest pool answer of a pool answer is itself (cosine 1)
    assert np.allclose(sims.max(axis=1), 1.0, atol=1e-5)
    mixed = [lists[0][:3] + ["처음 보는 답이에요."]]
    assert np.array_equal(pair_features(index, questions[:1], mixed, *args, reuse_pool=True),
                          pair_features(index, questions[:1], mixed, *args))


def test_select_scores_are_the_scores_of_its_shortlist():
    train, test = _sample_split()
    sel = ResponseSelector(dataclasses.replace(CFG, ranker_trees=20, ranker_shortlist=5)).fit(
        [e.text for e in train], [e.response for e in train], labels=[e.label for e in train])
    questions = [e.text for e in test[:6]]
    shortlists = sel._shortlist(questions, 5)
    for q, picks, best in zip(questions, shortlists, sel.select(questions, 3), strict=True):
        reference = sel.score([q], [picks])[0]  # the general path: candidates vectorised again
        order = np.argsort(-reference, kind="stable")[:3]
        assert [(picks[j], float(reference[j])) for j in order] == best
