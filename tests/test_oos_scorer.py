"""The learned out-of-scope scorer (``oos.policy: scorer``): neighbour similarity, features, the exact
threshold search, persistence, the policy around it, ensemble views, and a run end to end.

Expected values are computed independently (dense scikit-learn TF-IDF, brute-force loops over
``oos_metrics``, weighted means by hand), never copied from the code under test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from tests.test_oos import FILLER, INTENTS, _sentence, intent_cfg

from chatforge.baselines.ensemble import EnsembleClassifier, EnsembleConfig
from chatforge.bundle import load_bundle
from chatforge.config import OOSConfig, validate_config
from chatforge.evaluation.evaluate import evaluate_bundle
from chatforge.evaluation.metrics import DEFAULT_OOS_GRID, oos_metrics
from chatforge.evaluation.plots import oos_tradeoff_png
from chatforge.inference import Classifier
from chatforge.oos import (
    OOSError,
    OOSPolicy,
    choose_detector_threshold,
    choose_flag_threshold,
    fit_policy,
    fit_scorer,
    oos_tradeoff,
)
from chatforge.oos_scorer import SCORER_FILE, OOSScorer, OOSScorerError
from chatforge.training.run import run_experiment

OOS = "oos"
LABELS = ["flight", "music", OOS, "weather"]  # sorted, as the estimators order them; oos is not last
# in-scope training texts per intent; music has fewer than k=3 examples
TRAIN = {
    "weather": ["will it rain today", "sunny weather forecast for tomorrow", "what is the temperature outside",
                "do i need an umbrella today"],
    "flight": ["book a flight to paris", "my plane leaves the airport soon", "print my airline boarding pass",
               "find a cheap flight ticket"],
    "music": ["play my favourite song", "next album on the playlist"],
}
# oos-labelled training texts with words of their own: indexing them would change vocabulary and idf
OOS_TRAIN = ["zebra quokka xylophone", "quokka zebra marathon today"]
QUERIES = ["is it going to rain today", "book me a flight ticket", "play a song from that album",
           "quokka zebra", "completely unrelated words"]
# out-of-scope vocabulary sharing no word with INTENTS or FILLER
FOREIGN = ["volcano", "algebra", "pyramid", "knitting", "galaxy", "dinosaur", "zeppelin", "bagpipe", "origami",
           "lobster", "quokka", "xylophone"]
REFERENCE_VECTORIZERS = [  # the scorer's documented settings, written out independently
    {"analyzer": "word", "ngram_range": (1, 1), "min_df": 1},
    {"analyzer": "char_wb", "ngram_range": (2, 5), "min_df": 2},
]


def _pairs(by_intent: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    texts = [t for ts in by_intent.values() for t in ts]
    return texts, [k for k, ts in by_intent.items() for _ in ts]


def _train_with_oos() -> tuple[list[str], list[str]]:
    texts, labels = _pairs(TRAIN)
    return texts + OOS_TRAIN, labels + [OOS] * len(OOS_TRAIN)


def _unit_rows(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)


def reference_similarity(by_intent: dict[str, list[str]], texts: list[str], intents: list[str], k: int) -> np.ndarray:
    """Dense TF-IDF fitted on the in-scope training texts; mean of the top-k cosines to the intent's rows."""
    train_texts, train_labels = _pairs(by_intent)
    out = np.zeros((len(texts), len(REFERENCE_VECTORIZERS)))
    for j, kw in enumerate(REFERENCE_VECTORIZERS):
        vec = TfidfVectorizer(sublinear_tf=True, lowercase=True, norm=None, **kw).fit(train_texts)
        index, queries = (_unit_rows(vec.transform(x).toarray().astype(np.float64)) for x in (train_texts, texts))
        for i, intent in enumerate(intents):
            rows = [r for r, v in enumerate(train_labels) if v == intent]
            if rows:
                out[i, j] = np.mean(sorted(index[rows] @ queries[i], reverse=True)[:k])
    return out


def random_views(n_views: int, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.dirichlet(np.ones(len(LABELS)), size=n) for _ in range(n_views)]


# -- 1. neighbour similarity --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_neighbour_similarity_matches_dense_reference(k):
    scorer = OOSScorer(k=k).fit_neighbours(*_train_with_oos())
    intents = ["weather", "flight", "music", "weather", "no-such-intent"]
    got = scorer.neighbour_similarity(QUERIES, intents)
    expected = reference_similarity(TRAIN, QUERIES, intents, k)
    assert got.shape == (len(QUERIES), 2)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert (got[:3] > 0.1).all()  # the in-scope queries share words with their intent
    assert (got[4] == 0).all()  # unknown intent


def test_music_has_fewer_than_k_examples_and_averages_what_exists():
    scorer = OOSScorer(k=3).fit_neighbours(*_train_with_oos())
    got = scorer.neighbour_similarity(["play a song from that album"], ["music"])
    # music has 2 texts: the mean of both, not of 3 with a zero padded in
    np.testing.assert_allclose(got, reference_similarity(TRAIN, ["play a song from that album"], ["music"], 2),
                               atol=1e-6)


def test_oos_training_texts_are_not_indexed():
    scorer = OOSScorer().fit_neighbours(*_train_with_oos())
    assert scorer.train_texts == _pairs(TRAIN)[0] and OOS not in scorer.train_labels
    in_scope_only = TfidfVectorizer(analyzer="word").fit(_pairs(TRAIN)[0])
    assert set(scorer.tfidf.vectorizers["word"].vocabulary_) == set(in_scope_only.vocabulary_)
    # an oos training text queried against the oos "intent" finds nothing to be near
    assert (scorer.neighbour_similarity(OOS_TRAIN, [OOS, OOS]) == 0).all()
    with pytest.raises(OOSScorerError, match="needs in-scope training examples"):
        OOSScorer().fit_neighbours(OOS_TRAIN, [OOS] * len(OOS_TRAIN))


# -- 2. features ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_views", [1, 3])
def test_features_layout_and_values(n_views):
    texts = QUERIES[:3]
    views = random_views(n_views, len(texts), seed=n_views)
    # row 0: oos is views[0]'s argmax, weather the best in-scope column; views[1:] point elsewhere
    views[0][0] = [0.1, 0.05, 0.6, 0.25]
    for v in views[1:]:
        v[0] = [0.7, 0.1, 0.1, 0.1]
    scorer = OOSScorer(k=2).fit_neighbours(*_train_with_oos())
    feats = scorer.features(views, LABELS, texts)
    assert feats.shape == (len(texts), 2 * n_views + 2)
    in_scope = [0, 1, 3]
    for i, v in enumerate(views):
        np.testing.assert_allclose(feats[:, 2 * i], np.log(v[:, in_scope].max(axis=1)))
        np.testing.assert_allclose(feats[:, 2 * i + 1], np.log(v[:, 2] + 1e-6))
    intents = [LABELS[in_scope[j]] for j in views[0][:, in_scope].argmax(axis=1)]
    assert intents[0] == "weather"
    np.testing.assert_allclose(feats[:, -2:], reference_similarity(TRAIN, texts, intents, 2), atol=1e-6)
    assert feats[0, -2] > 0.1  # the neighbour of a weather text under "weather", not under "oos" (0)


@pytest.mark.parametrize("shapes", [[(3, 3)], [(2, 4)], [(3, 4), (3, 5)]])
def test_features_reject_bad_view_shapes(shapes):
    scorer = OOSScorer().fit_neighbours(*_train_with_oos())
    with pytest.raises(OOSScorerError, match=r"expected \(3, 4\) for 3 texts over 4 labels"):
        scorer.features([np.full(s, 0.25) for s in shapes], LABELS, QUERIES[:3])
    with pytest.raises(OOSScorerError, match="at least one view"):
        scorer.features([], LABELS, QUERIES[:3])


# -- 3. the exact threshold search ------------------------------------------------------------------------------


def brute_force_threshold(main, p, y, candidates, max_in_scope_drop=None, prefer=0.5):
    """Every candidate through oos_metrics; best acc + recall within the bound; ties nearest ``prefer``."""
    base = oos_metrics(y, list(main), OOS)["in_scope_accuracy"] or 0.0
    rows = []
    for t in sorted(candidates):
        m = oos_metrics(y, [OOS if q >= t else mp for mp, q in zip(main, p, strict=True)], OOS)
        acc, rec = m["in_scope_accuracy"] or 0.0, m["oos_recall"] or 0.0
        if max_in_scope_drop is None or acc >= base - max_in_scope_drop - 1e-12:
            rows.append((t, acc + rec, m))
    if not rows:
        return max(candidates)
    best = max(s for _, s, _ in rows)
    tied = [t for t, s, _ in rows if s >= best - 1e-12]
    return min(tied, key=lambda t: abs(t - prefer))  # min keeps the first (lowest) on equal distance


def random_flag_problem(seed: int, n: int = 40):
    rng = np.random.default_rng(seed)
    y = list(rng.choice(["a", "b", OOS], size=n, p=[0.4, 0.3, 0.3]))
    y[:2] = ["a", OOS]  # both kinds present
    main = [t if rng.random() < 0.7 else str(rng.choice(["a", "b", OOS])) for t in y]
    # oos a little higher on average; rounded coarsely, so equal scores (ties) are common
    p = np.round(np.clip(0.3 * np.array([v == OOS for v in y]) + 0.7 * rng.random(n), 0, 1), 1)
    return main, p, y


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_in_scope_drop", [None, 0.0, 0.1])
@pytest.mark.parametrize("prefer", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("grid", [None, (0.05, 0.35, 0.65, 0.95)])
def test_choose_flag_threshold_equals_brute_force(seed, max_in_scope_drop, prefer, grid):
    main, p, y = random_flag_problem(seed)
    t, m = choose_flag_threshold(main, p, y, OOS, grid=grid, max_in_scope_drop=max_in_scope_drop, prefer=prefer)
    # default, the documented exact search: every distinct p value, plus one above them all
    candidates = grid or [*sorted(set(p.tolist())), float(np.nextafter(p.max(), np.inf))]
    assert t == brute_force_threshold(main, p, y, candidates, max_in_scope_drop, prefer)
    expected = oos_metrics(y, [OOS if q >= t else mp for mp, q in zip(main, p, strict=True)], OOS)
    assert m == {**expected, "criterion": expected["in_scope_accuracy"] + expected["oos_recall"]}


@pytest.mark.parametrize("seed", range(3))
def test_oos_tradeoff_walks_every_threshold_from_nothing_to_everything(seed):
    main, p, y = random_flag_problem(seed)
    acc, rec = oos_tradeoff(main, p, y, OOS)
    expected = [oos_metrics(y, [OOS if q >= t else mp for mp, q in zip(main, p, strict=True)], OOS)
                for t in [np.inf, *sorted(set(p.tolist()), reverse=True)]]
    np.testing.assert_allclose(acc, [m["in_scope_accuracy"] for m in expected])
    np.testing.assert_allclose(rec, [m["oos_recall"] for m in expected])
    assert rec[-1] == 1.0 and (np.diff(acc) <= 0).all() and (np.diff(rec) >= 0).all()
    png = oos_tradeoff_png({"scorer": (acc, rec)}, points=[("published", 93.5, 47.4)], goal=(93.5, 55.0))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="differ in length"):
        oos_tradeoff_png({"bad": (acc, rec[:-1])})


def test_prefer_breaks_ties_between_equally_good_thresholds():
    # candidates 0.3 (flag both: 0 + 1), 0.6 (flag the oos one: 1 + 1), above 0.6 (flag none: 1 + 0)
    main, y, p = ["a", "a"], ["a", OOS], np.array([0.3, 0.6])
    assert choose_flag_threshold(main, p, y, OOS)[0] == 0.6
    main, y, p = ["a", "a", "b", "b"], ["a", OOS, "b", OOS], np.array([0.3, 0.3, 0.8, 0.8])
    # every candidate (0.3, 0.8, above 0.8) scores 1.0: prefer decides
    assert choose_flag_threshold(main, p, y, OOS, prefer=0.0)[0] == 0.3
    assert choose_flag_threshold(main, p, y, OOS, prefer=0.75)[0] == 0.8
    assert choose_flag_threshold(main, p, y, OOS, prefer=1.0)[0] > 0.8


def test_no_threshold_within_the_bound_falls_back_to_the_highest():
    # every grid threshold flags the right, sure in-scope example (p 0.99): none keeps accuracy; flag the least
    main, y, p = ["a", "a"], ["a", OOS], np.array([0.99, 0.3])
    t, m = choose_flag_threshold(main, p, y, OOS, grid=(0.5, 0.2), max_in_scope_drop=0.0)
    assert t == 0.5 and m["in_scope_accuracy"] == 0.0 and m["oos_recall"] == 0.0
    assert choose_flag_threshold(main, p, y, OOS, grid=(0.5, 0.2))[0] == 0.2  # unbounded: catch the oos one


@pytest.mark.parametrize(("in_scope_p", "oos_p", "expected"), [
    ([0.1, 0.2], [0.8, 0.9], 0.5),  # perfect on (0.2, 0.8]: 0.5 itself
    ([0.1, 0.2], [0.35, 0.4], 0.35),  # perfect on (0.2, 0.35]: the end nearest 0.5
    ([0.6, 0.7], [0.9, 0.95], 0.71),  # perfect on (0.7, 0.9]: the grid point nearest 0.5
])
def test_choose_detector_threshold_prefers_the_half_side(in_scope_p, oos_p, expected):
    main, y = ["a", "b", "a", "b"], ["a", "b", OOS, OOS]
    t, m = choose_detector_threshold(main, np.array(in_scope_p + oos_p), y, OOS)
    assert t == pytest.approx(expected) and m["in_scope_accuracy"] == 1.0 and m["oos_recall"] == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_choose_detector_threshold_equals_brute_force_over_grid(seed):
    main, p, y = random_flag_problem(seed)
    p = np.round(p + np.random.default_rng(seed).normal(0, 0.03, len(p)), 2)
    assert choose_detector_threshold(main, p, y, OOS)[0] == brute_force_threshold(main, p, y, DEFAULT_OOS_GRID)


# -- 4. the scorer beats the plain threshold where max probability cannot tell ---------------------------------


def intent_of(text: str) -> str | None:
    words = set(text.split())
    return next((k for k, ws in INTENTS.items() if words & set(ws)), None)


def intent_of_fallback(text: str) -> str:
    return sorted(INTENTS)[len(text) % len(INTENTS)]


def confidently_wrong_proba(texts: list[str]) -> np.ndarray:
    """Right on in-scope texts, wrong on the rest, and 0.9 sure every time: max-probability is blind."""
    out = np.full((len(texts), len(LABELS)), 0.1 / 3)
    for i, t in enumerate(texts):
        out[i, LABELS.index(intent_of(t) or intent_of_fallback(t))] = 0.9
    return out


def constructed_split(seed: int, n_per_intent: int, n_oos: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts = [_sentence(rng, ws) for ws in INTENTS.values() for _ in range(n_per_intent)]
    labels = [k for k in INTENTS for _ in range(n_per_intent)]
    texts += [" ".join(rng.sample(FOREIGN, 3)) for _ in range(n_oos)]
    return texts, labels + [OOS] * n_oos


@pytest.fixture(scope="module")
def constructed():
    train = constructed_split(0, 10, 6)
    valid = constructed_split(1, 6, 8)
    held_out = constructed_split(2, 8, 10)
    assert not set(held_out[0]) & (set(train[0]) | set(valid[0]))
    assert not {w for t in held_out[0][-10:] for w in t.split()} & {w for ws in INTENTS.values() for w in ws + FILLER}

    def fit(policy: str) -> OOSPolicy:
        return fit_policy(OOSConfig(policy=policy, label=OOS, threshold=None, max_in_scope_drop=0.0),
                          confidently_wrong_proba, LABELS, *valid, *train)

    return SimpleNamespace(train=train, valid=valid, held_out=held_out, scorer=fit("scorer"),
                           threshold=fit("threshold"))


def held_out_metrics(policy: OOSPolicy, texts: list[str], y: list[str]) -> dict:
    return oos_metrics(y, policy.decide(confidently_wrong_proba(texts), LABELS, texts), OOS)


def test_scorer_beats_threshold_on_held_out_data(constructed):
    texts, y = constructed.held_out
    probs = confidently_wrong_proba(texts)
    assert (probs.max(axis=1) == 0.9).all() and OOS not in [LABELS[i] for i in probs.argmax(axis=1)]
    thr = held_out_metrics(constructed.threshold, texts, y)
    sc = held_out_metrics(constructed.scorer, texts, y)
    assert constructed.scorer.policy == "scorer" and constructed.scorer.threshold is None
    assert sc["oos_recall"] > thr["oos_recall"]
    assert sc["in_scope_accuracy"] >= thr["in_scope_accuracy"]
    assert sc["in_scope_accuracy"] == 1.0  # max_in_scope_drop 0.0 held on unseen texts too


def test_scorer_threshold_respects_max_in_scope_drop_and_a_fixed_threshold(constructed):
    # in-scope examples the classifier gets right but that look like oos (foreign words): catching the
    # oos examples costs them, which the paper's criterion accepts and a 0.0 bound refuses
    rng = random.Random(8)
    hard = [" ".join(rng.sample(FOREIGN, 3)) for _ in range(4)]
    texts, y = constructed.valid[0] + hard, constructed.valid[1] + [intent_of_fallback(t) for t in hard]
    assert confidently_wrong_proba(hard).argmax(axis=1).tolist() == [LABELS.index(v) for v in y[-4:]]

    def fit(**cfg) -> OOSPolicy:
        return fit_policy(OOSConfig(policy="scorer", **cfg), confidently_wrong_proba, LABELS, texts, y,
                          *constructed.train)

    bounded, free = fit(max_in_scope_drop=0.0), fit()
    assert bounded.valid_metrics["in_scope_accuracy"] == 1.0 > free.valid_metrics["in_scope_accuracy"]
    assert free.valid_metrics["oos_recall"] > bounded.valid_metrics["oos_recall"]
    fixed = fit(threshold=0.3)
    assert fixed.detector_threshold == 0.3 and fixed.threshold is None
    probs = confidently_wrong_proba(texts)
    p = fixed.scorer.oos_probability([probs], LABELS, texts)
    main = [LABELS[i] for i in probs.argmax(axis=1)]
    assert fixed.valid_metrics == oos_metrics(y, [OOS if q >= 0.3 else v for v, q in zip(main, p, strict=True)], OOS)


# -- 5. persistence ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_scorer() -> OOSScorer:
    texts, y = constructed_split(3, 5, 6)
    scorer = OOSScorer(k=2).fit_neighbours(*constructed_split(4, 6, 4))
    feats = scorer.features([confidently_wrong_proba(texts)], LABELS, texts)
    return scorer.fit(feats, [v == OOS for v in y])


def test_save_load_round_trip_is_bit_identical(fitted_scorer, tmp_path):
    texts = constructed_split(5, 3, 4)[0]
    views = [confidently_wrong_proba(texts)]
    loaded = OOSScorer.load(fitted_scorer.save(tmp_path / "s"))
    before = fitted_scorer.oos_probability(views, LABELS, texts)
    assert np.array_equal(loaded.oos_probability(views, LABELS, texts), before)
    assert loaded.n_views == 1 and (loaded.label, loaded.k) == (OOS, 2)
    assert 0 < before.min() < 0.5 < before.max() < 1  # a real model, not a constant
    with pytest.raises(OOSScorerError, match="fitted on 1 view"):
        loaded.oos_probability(views * 2, LABELS, texts)


def test_load_refuses_wrong_version_and_missing_file(fitted_scorer, tmp_path):
    d = fitted_scorer.save(tmp_path / "s")
    state = json.loads((d / SCORER_FILE).read_text())
    (d / SCORER_FILE).write_text(json.dumps({**state, "format_version": 999}))
    with pytest.raises(ValueError, match="format_version 999"):
        OOSScorer.load(d)
    with pytest.raises(FileNotFoundError, match=f"missing {SCORER_FILE}"):
        OOSScorer.load(tmp_path / "nothing-here")


# -- 6. the policy around it ---------------------------------------------------------------------------------


def test_policy_metadata_round_trip(constructed, tmp_path):
    policy = constructed.scorer
    extra = policy.extra_dirs()
    assert list(extra) == ["oos_scorer"]
    for sub, obj in extra.items():
        obj.save(tmp_path / sub)
    meta = json.loads(json.dumps(policy.to_metadata()))
    assert meta["policy"] == "scorer" and meta["detector_threshold"] == policy.detector_threshold
    again = OOSPolicy.from_metadata(meta, tmp_path)
    texts, _ = constructed.held_out
    probs = confidently_wrong_proba(texts)
    decided = policy.decide(probs, LABELS, texts)
    assert OOS in decided and set(decided) != {OOS}
    assert again.decide(probs, LABELS, texts) == decided == again.decide(probs, LABELS, texts, [probs])
    with pytest.raises(OOSError, match="bundle folder"):
        OOSPolicy.from_metadata(meta)


def test_fit_scorer_needs_oos_in_validation(constructed):
    texts, y = constructed.valid
    in_scope = [i for i, v in enumerate(y) if v != OOS]
    with pytest.raises(OOSError, match="oos.policy=scorer"):
        fit_scorer([confidently_wrong_proba([texts[i] for i in in_scope])], LABELS, [texts[i] for i in in_scope],
                   [y[i] for i in in_scope], *constructed.train)


# -- 7. end to end ------------------------------------------------------------------------------------------------


def check_scorer_bundle(res, tmp_path: Path, n_views: int) -> None:
    """The bundle holds the scorer; serving, the run's metrics and ``evaluate`` all apply it alike."""
    assert (res.bundle_dir / "oos_scorer" / SCORER_FILE).is_file()
    meta = json.loads((res.bundle_dir / "metadata.json").read_text())["oos"]
    assert meta["policy"] == "scorer" and meta["detector_threshold"] == res.metrics["oos_detector_threshold"]

    bundle = load_bundle(res.bundle_dir)
    clf = Classifier(bundle, name="intents")
    rng = random.Random(7)
    texts = [_sentence(rng, ws) for ws in INTENTS.values()] + [" ".join(rng.sample(FOREIGN, 3)) for _ in range(3)]
    model = bundle.model
    views = model.predict_views(texts) if n_views > 1 else [np.asarray(model.predict_proba(texts), dtype=np.float64)]
    scorer = OOSScorer.load(res.bundle_dir / "oos_scorer")
    assert len(views) == scorer.n_views == n_views
    flagged = scorer.oos_probability(views, bundle.labels, texts) >= meta["detector_threshold"]
    argmax_oos = np.array([bundle.labels[i] == OOS for i in views[0].argmax(axis=1)])
    served = clf.classify(texts)
    assert [p.out_of_scope for p in served] == (flagged | argmax_oos).tolist()
    assert [p.label for p in served] == clf.oos.decide(views[0], bundle.labels, texts, views)
    clf.oos.detector_threshold = 0.0  # P(oos) >= 0 always: the served answer follows the scorer
    assert all(p.out_of_scope for p in clf.classify(texts))

    # batches of 4: the views of every batch are put back together before the policy reads them
    ev = evaluate_bundle(res.bundle_dir, split="valid", out_dir=tmp_path / "eval", track=False, batch_size=4)
    assert ev.summary["metrics"]["in_scope_accuracy"] == res.metrics["valid_in_scope_accuracy"]
    assert ev.summary["metrics"]["oos_recall"] == res.metrics["valid_oos_recall"]
    assert ev.summary["metrics"]["oos_policy"]["policy"] == "scorer"


def test_scorer_policy_end_to_end(tmp_path):
    res = run_experiment(validate_config(intent_cfg(tmp_path, oos={"policy": "scorer"})), run_dir=tmp_path / "r")
    check_scorer_bundle(res, tmp_path, n_views=1)


def test_the_classify_rpc_answers_with_the_scorer(tmp_path):
    from tests.serving_fakes import WAIT, ServerThread, make_engine

    from chatforge.client import ChatbotClient
    from chatforge.inference import load_model

    res = run_experiment(validate_config(intent_cfg(tmp_path, oos={"policy": "scorer"})), run_dir=tmp_path / "r")
    clf = load_model(res.bundle_dir, "intents")
    rng = random.Random(11)
    texts = [_sentence(rng, ws) for ws in INTENTS.values()] + [" ".join(rng.sample(FOREIGN, 3)) for _ in range(3)]
    local = clf.classify(texts)
    assert any(p.out_of_scope for p in local) and not all(p.out_of_scope for p in local)
    with ServerThread(make_engine(classifiers={"intents": clf})) as st, ChatbotClient(st.target, timeout=WAIT) as client:
        st.wait_serving()
        served = [client.classify(t, model="intents") for t in texts]
    assert [(p.label, p.out_of_scope) for p in served] == [(p.label, p.out_of_scope) for p in local]


def test_scorer_policy_on_a_two_family_ensemble_end_to_end(tmp_path):
    xgb = {"n_estimators": 5, "max_depth": 2, "early_stopping_rounds": 0, "n_jobs": 1}
    members = [run_experiment(validate_config(intent_cfg(tmp_path, family=family, name=family, **params)),
                              run_dir=tmp_path / family).bundle_dir
               for family, params in (("linear", {}), ("xgboost", xgb))]
    tree = intent_cfg(tmp_path, family="ensemble", name="ens", members=[str(m) for m in members],
                      oos={"policy": "scorer", "max_in_scope_drop": 0.1})
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "ens")
    check_scorer_bundle(res, tmp_path, n_views=3)  # combined, linear, xgboost


# -- 8. ensemble views ---------------------------------------------------------------------------------------


class FamilyMember:
    """A fake ensemble member of a given family, with its own label order and fixed random probabilities."""

    def __init__(self, family: str, seed: int, labels: list[str]):
        self.info = SimpleNamespace(family=family)
        self.labels = labels
        self.seed = seed

    def predict_proba(self, texts):
        return np.random.default_rng([self.seed, len(texts)]).dirichlet(np.ones(len(self.labels)), size=len(texts))


def _in_ensemble_order(member: FamilyMember, texts: list[str]) -> np.ndarray:
    p = member.predict_proba(texts)
    return p[:, [member.labels.index(v) for v in LABELS]]


@pytest.mark.parametrize("method", ["average", "geometric", "stacking"])
def test_ensemble_views_one_per_family(method):
    members = [FamilyMember("linear", 0, LABELS), FamilyMember("xgboost", 1, LABELS[::-1]),
               FamilyMember("linear", 2, [LABELS[i] for i in (2, 0, 3, 1)])]
    weights = [1.0, 2.0, 3.0] if method != "stacking" else None
    ens = EnsembleClassifier.from_members(members, EnsembleConfig(members=["m0", "m1", "m2"], method=method,
                                                                  weights=weights))
    texts = QUERIES
    if method == "stacking":
        ens.fit_meta(texts, ["flight", "music", "weather", OOS, OOS])
    views = ens.predict_views(texts)
    p = [_in_ensemble_order(m, texts) for m in members]
    w = weights or [1.0, 1.0, 1.0]
    assert ens.member_kinds() == ["linear", "xgboost", "linear"] and len(views) == 3
    np.testing.assert_allclose(views[0], ens.predict_proba(texts), atol=1e-6)
    if method == "geometric":  # each kind's view pooled the way the ensemble pools
        g = p[0] ** (w[0] / (w[0] + w[2])) * p[2] ** (w[2] / (w[0] + w[2]))
        np.testing.assert_allclose(views[1], g / g.sum(axis=1, keepdims=True), atol=1e-9)
    else:
        np.testing.assert_allclose(views[1], (w[0] * p[0] + w[2] * p[2]) / (w[0] + w[2]), atol=1e-12)
    np.testing.assert_allclose(views[2], p[1], atol=1e-9)


def test_single_family_ensemble_gives_one_view():
    members = [FamilyMember("linear", 0, LABELS), FamilyMember("linear", 1, LABELS[::-1])]
    ens = EnsembleClassifier.from_members(members, EnsembleConfig(members=["m0", "m1"]))
    views = ens.predict_views(QUERIES)
    assert len(views) == 1
    np.testing.assert_allclose(views[0], ens.predict_proba(QUERIES), atol=1e-6)
    np.testing.assert_allclose(views[0], sum(_in_ensemble_order(m, QUERIES) for m in members) / 2, atol=1e-6)


def test_scorer_reads_every_view_of_an_ensemble():
    members = [FamilyMember("linear", 0, LABELS), FamilyMember("xgboost", 1, LABELS)]
    ens = EnsembleClassifier.from_members(members, EnsembleConfig(members=["m0", "m1"]))
    texts, y = constructed_split(6, 4, 4)
    policy = fit_policy(OOSConfig(policy="scorer"), ens.predict_proba, LABELS, texts, y, *constructed_split(7, 5, 3),
                        predict_views=ens.predict_views)
    assert policy.scorer.n_views == 3 and len(policy.scorer.coef) == 2 * 3 + 2
    views = ens.predict_views(texts)
    p_oos = policy.scorer.oos_probability(views, LABELS, texts)
    expected = [OOS if q >= policy.detector_threshold else LABELS[i] for i, q in zip(views[0].argmax(axis=1), p_oos,
                                                                                      strict=True)]
    assert policy.decide(views[0], LABELS, texts, views) == expected
    with pytest.raises(OOSScorerError, match="fitted on 3 view"):
        policy.decide(views[0], LABELS, texts)  # without views: the combined probabilities only


def test_a_family_weighted_out_of_the_average_still_gets_an_equal_weight_view():
    members = [FamilyMember("linear", 0, LABELS), FamilyMember("xgboost", 1, LABELS),
               FamilyMember("xgboost", 2, LABELS)]
    ens = EnsembleClassifier.from_members(members, EnsembleConfig(members=["m0", "m1", "m2"],
                                                                  weights=[1.0, 0.0, 0.0]))
    views = ens.predict_views(QUERIES)
    p = [_in_ensemble_order(m, QUERIES) for m in members]
    np.testing.assert_allclose(views[2], (p[1] + p[2]) / 2, atol=1e-12)


def test_neighbour_similarity_needs_one_intent_per_text_and_training_data():
    scorer = OOSScorer().fit_neighbours(*_train_with_oos())
    with pytest.raises(OOSScorerError, match="one intent per text"):
        scorer.neighbour_similarity(["will it rain today", "book a flight"], ["weather"])
    with pytest.raises(OOSScorerError, match="got none"):
        OOSScorer().fit_neighbours([], [])


def test_ensemble_views_run_each_member_once():
    members = [FamilyMember("linear", 0, LABELS), FamilyMember("xgboost", 1, LABELS)]
    calls = []
    for m in members:
        inner = m.predict_proba
        m.predict_proba = lambda texts, inner=inner: calls.append(1) or inner(texts)
    ens = EnsembleClassifier.from_members(members, EnsembleConfig(members=["m0", "m1"]))
    views = ens.predict_views(QUERIES)
    assert len(calls) == 2 and len(views) == 3
    np.testing.assert_allclose(views[0], ens.predict_proba(QUERIES), atol=1e-6)
