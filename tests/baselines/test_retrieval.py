"""The retrieval family: TF-IDF and bi-encoder response selectors, their bundle, and the selection run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatforge.baselines.retrieval import ResponseSelector, RetrievalConfig
from chatforge.baselines.retrieval.model import _dedupe_pairs, _in_batch_loss
from chatforge.bundle import load_bundle
from chatforge.config import validate_config
from chatforge.data import read_examples, sample_corpus_path
from chatforge.evaluation.evaluate import evaluate_bundle
from chatforge.training.run import run_experiment

PAIRS = [
    ("오늘 날씨 어때", "맑고 화창해요."), ("날씨 좋다", "맑고 화창해요."), ("비 온대", "우산 챙기세요."),
    ("비가 와", "우산 챙기세요."), ("배고파", "맛있는 거 드세요."), ("밥 먹고 싶다", "맛있는 거 드세요."),
    ("졸려", "일찍 주무세요."), ("잠이 와", "일찍 주무세요."), ("심심해", "같이 이야기해요."),
    ("놀아줘", "같이 이야기해요."), ("헤어졌어", "많이 힘드시겠어요."), ("이별했어", "많이 힘드시겠어요."),
]
Q, A = [p[0] for p in PAIRS], [p[1] for p in PAIRS]


def test_pool_is_deduplicated_answers_with_their_source_questions():
    pool, qs, answer_of = _dedupe_pairs(Q + ["졸려"], A + ["일찍 주무세요."])
    assert pool == list(dict.fromkeys(A))
    assert qs == Q  # the exact duplicate pair counts once
    assert [pool[i] for i in answer_of] == A


def test_tfidf_selector_answers_paraphrases_from_the_neighbour_answers_and_round_trips(tmp_path):
    sel = ResponseSelector(RetrievalConfig(encoder="tfidf", neighbours=3)).fit(Q, A)
    assert sel.reply("오늘 비 온대")[0] == "우산 챙기세요."
    # the true answer shares no character with the question: only the neighbour term can rank it first
    scores = sel.score(["잠이 와요"], [["맑고 화창해요.", "일찍 주무세요.", "같이 이야기해요."]])[0]
    assert int(np.argmax(scores)) == 1
    without = ResponseSelector(RetrievalConfig(encoder="tfidf", neighbours=0)).fit(Q, A)
    assert without.score(["잠이 와요"], [["맑고 화창해요.", "일찍 주무세요."]])[0].tolist() == [0.0, 0.0]
    sel.save(tmp_path)
    back = ResponseSelector.load(tmp_path)
    assert back.select(["배고파요", "헤어졌어"], 3) == sel.select(["배고파요", "헤어졌어"], 3)


def test_in_batch_loss_treats_a_shared_answer_as_positive_not_negative():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    a = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    target = torch.tensor([0, 0, 1])  # questions 0 and 1 share answer 0
    got = _in_batch_loss(q, a, target, temperature=0.5, qq_weight=0.0)
    logits = (q @ a.T / 0.5).tolist()
    by_hand = -np.mean([row[t] - np.log(np.exp(row).sum()) for row, t in zip(logits, [0, 0, 1], strict=True)])
    assert float(got) == pytest.approx(by_hand, rel=1e-5)
    # question->question term: question 2 has no partner, so only rows 0 and 1 add to it
    qq = (q @ q.T / 0.5).tolist()
    lse = [np.log(sum(np.exp(qq[i][j]) for j in range(3) if j != i)) for i in range(3)]
    extra = -np.mean([qq[0][1] - lse[0], qq[1][0] - lse[1]])
    assert float(_in_batch_loss(q, a, target, 0.5, 1.0)) == pytest.approx(by_hand + extra, rel=1e-5)


def test_biencoder_learns_the_pairs_and_loads_its_encoded_pool(tmp_path):
    torch.set_num_threads(1)
    cfg = RetrievalConfig(encoder="biencoder", vocab_size=80, d_model=16, n_heads=2, num_layers=1, d_ff=32,
                          dropout=0.0, epochs=30, batch_size=12, lr=1e-2, neighbours=0)
    sel = ResponseSelector(cfg).fit(Q, A, Q, A)
    assert sel.history[-1]["train_loss"] < sel.history[0]["train_loss"]
    hits = [sel.reply(q)[0] == a for q, a in PAIRS]
    assert np.mean(hits) >= 0.75  # overfits 12 pairs; chance is 1/6
    sel.save(tmp_path)
    back = ResponseSelector.load(tmp_path)
    np.testing.assert_allclose(back._pool_vecs, sel._pool_vecs)
    assert [r[0] for r in back.select(Q)[0]] == [r[0] for r in sel.select(Q)[0]]
    (tmp_path / "encoder.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="encoder.safetensors"):
        ResponseSelector.load(tmp_path)


def test_config_rejects_unknown_encoder():
    with pytest.raises(Exception, match="encoder"):
        validate_config({"name": "x", "model": {"family": "retrieval", "task": "selection", "encoder": "dpr"}})


@pytest.mark.slow
def test_selection_run_reports_r1_and_writes_a_bundle_without_labels(tmp_path):
    cfg = validate_config({
        "name": "sel", "seed": 0,
        "data": {"path": "sample", "format": "chatbot_csv", "valid_fraction": 0.1, "test_fraction": 0.2},
        "model": {"family": "retrieval", "task": "selection", "encoder": "tfidf", "neighbours": 5},
        "tracking": {"enabled": False},
    })
    res = run_experiment(cfg, run_dir=tmp_path / "run")
    m = res.metrics
    assert 0.0 <= m["test_mrr_of_10"] <= 1.0 and m["test_r1_of_10"] > 0.1 + 0.1  # chance is 0.1
    assert "test_chrf" in m and m["pool_size"] > 10
    assert not (res.bundle_dir / "labels.json").exists()
    b = load_bundle(res.bundle_dir)
    assert b.task == "selection" and b.labels is None
    examples, _ = read_examples(sample_corpus_path())
    question = examples[0].text
    assert b.model.reply(question)[0] == res_reply(res.bundle_dir, question)
    # chatforge evaluate draws the same seeded candidates for the test split as the run did
    ev = evaluate_bundle(res.bundle_dir, split="test", out_dir=tmp_path / "eval", track=False)
    for k in ("r1_of_10", "mrr_of_10", "chrf", "identical_rate"):
        assert ev.summary["metrics"][k] == pytest.approx(m[f"test_{k}"])
    assert (tmp_path / "eval" / "evaluation.md").read_text(encoding="utf-8").count("r1_of_10") == 1


def res_reply(bundle_dir, question):
    return ResponseSelector.load(bundle_dir).reply(question)[0]


def test_tfidf_weight_adds_the_tfidf_scorer_to_the_biencoder_and_round_trips(tmp_path):
    torch.set_num_threads(1)
    kw = dict(encoder="biencoder", vocab_size=80, d_model=16, n_heads=2, num_layers=1, d_ff=32, dropout=0.0,
              epochs=2, batch_size=12, neighbours=3)
    alone = ResponseSelector(RetrievalConfig(**kw)).fit(Q, A)
    both = ResponseSelector(RetrievalConfig(**kw, tfidf_weight=2.0)).fit(Q, A)
    tfidf = ResponseSelector(RetrievalConfig(encoder="tfidf", neighbours=3)).fit(Q, A)
    cands = [["맑고 화창해요.", "일찍 주무세요.", "우산 챙기세요."]]
    expected = alone.score(["잠이 와요"], cands)[0] + 2.0 * tfidf.score(["잠이 와요"], cands)[0]
    np.testing.assert_allclose(both.score(["잠이 와요"], cands)[0], expected, rtol=1e-5)
    both.save(tmp_path)
    back = ResponseSelector.load(tmp_path)
    assert back.select(["비 와요"], 3) == both.select(["비 와요"], 3)
