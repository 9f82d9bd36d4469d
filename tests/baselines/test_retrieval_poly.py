"""The poly-encoder response selector (``encoder: polyencoder``): its score, its reduction to the bi-encoder,
training, the bundle round trip and its config keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chatforge.baselines.retrieval import BiEncoder, PolyEncoder, ResponseSelector, RetrievalConfig
from chatforge.baselines.retrieval.model import poly_scores
from chatforge.config import ConfigError, validate_config

PAIRS = [
    ("오늘 날씨 어때", "맑고 화창해요."), ("날씨 좋다", "맑고 화창해요."), ("비 온대", "우산 챙기세요."),
    ("비가 와", "우산 챙기세요."), ("배고파", "맛있는 거 드세요."), ("밥 먹고 싶다", "맛있는 거 드세요."),
    ("졸려", "일찍 주무세요."), ("잠이 와", "일찍 주무세요."), ("심심해", "같이 이야기해요."),
    ("놀아줘", "같이 이야기해요."), ("헤어졌어", "많이 힘드시겠어요."), ("이별했어", "많이 힘드시겠어요."),
]
Q, A = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
TINY = dict(encoder="polyencoder", poly_codes=4, vocab_size=80, d_model=16, n_heads=2, num_layers=1, d_ff=32,
            dropout=0.0, batch_size=12)


def _naive(ctx: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """The definition, one (question, candidate) pair at a time: attend, sum, cosine."""
    out = torch.empty(len(ctx), len(cands))
    for b, y in enumerate(ctx):  # (m, D)
        for u, c in enumerate(cands):
            w = torch.softmax(y @ c, dim=0)  # (m,)
            out[b, u] = F.cosine_similarity(w @ y, c, dim=0)
    return out


def test_poly_scores_match_the_definition_and_each_candidate_is_scored_on_its_own():
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(3, 5, 8, generator=g) * 2
    cands = F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    s = poly_scores(ctx, cands)
    assert s.shape == (3, 7)
    torch.testing.assert_close(s, _naive(ctx, cands), rtol=1e-5, atol=1e-6)
    assert float(s.abs().max()) <= 1.0 + 1e-6  # cosines
    perm = torch.randperm(7, generator=g)
    torch.testing.assert_close(poly_scores(ctx, cands[perm]), s[:, perm])
    torch.testing.assert_close(poly_scores(ctx, cands[[4, 1]]), s[:, [4, 1]])  # the others do not matter
    # the candidate's attention is what makes it a poly-encoder: a fixed (mean) attention scores differently
    fixed = F.normalize(ctx.mean(1), dim=-1) @ cands.T
    assert not torch.allclose(s, fixed, atol=1e-3)


def _nets(codes: int) -> tuple[PolyEncoder, BiEncoder]:
    torch.manual_seed(0)
    args = (30, 0, 16, 2, 2, 32, 0.0, 12)  # vocab, pad id, d_model, heads, layers, d_ff, dropout, max_len
    poly, bi = PolyEncoder(*args, codes=codes).eval(), BiEncoder(*args).eval()
    bi.load_state_dict({k: v for k, v in poly.state_dict().items() if k != "codes"})
    return poly, bi


def test_one_code_is_an_attention_pooled_biencoder_and_a_zero_code_is_the_biencoder_itself():
    poly, bi = _nets(codes=1)
    q = torch.tensor([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12], [13, 2, 0, 0, 0, 0]])  # padded (pad id 0)
    a = torch.tensor([[5, 9, 14, 0], [20, 21, 22, 23], [4, 0, 0, 0], [25, 26, 27, 0]])
    with torch.no_grad():
        cands = bi(a)
        torch.testing.assert_close(poly(a), cands)  # candidate side: the bi-encoder's vector
        ctx, _ = poly.context(q)
        # m = 1: one question vector, the same for every candidate -> a plain cosine, as in the bi-encoder
        torch.testing.assert_close(poly_scores(ctx, cands), F.normalize(ctx[:, 0], dim=-1) @ cands.T)
        assert not torch.allclose(poly_scores(ctx, cands), bi(q) @ cands.T, atol=1e-4)  # a learned pooling
        # a zero code attends uniformly over the real tokens (padding masked): the bi-encoder's mean pooling
        poly.codes.zero_()
        ctx, _ = poly.context(q)
        torch.testing.assert_close(poly_scores(ctx, cands), bi(q) @ cands.T, rtol=1e-5, atol=1e-6)
        qa, qq = poly.batch_sims(q, a)
        bqa, bqq = bi.batch_sims(q, a)
        torch.testing.assert_close(qa, bqa, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(qq, bqq, rtol=1e-5, atol=1e-6)


def test_context_ignores_padding():
    poly, _ = _nets(codes=3)
    with torch.no_grad():
        short, _ = poly.context(torch.tensor([[3, 4, 5]]))
        padded, _ = poly.context(torch.tensor([[3, 4, 5, 0, 0, 0, 0]]))
    torch.testing.assert_close(short, padded, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def trained() -> ResponseSelector:
    torch.set_num_threads(1)
    cfg = RetrievalConfig(**TINY, epochs=30, lr=1e-2, neighbours=3)
    return ResponseSelector(cfg).fit(Q, A, Q, A)


def test_training_lowers_the_in_batch_loss_and_memorises_the_pairs(trained):
    h = trained.history
    assert h[-1]["train_loss"] < 0.5 * h[0]["train_loss"]
    pool = trained.pool
    scores = trained.score(Q, [pool] * len(Q))
    assert [pool[int(np.argmax(s))] for s in scores] == A  # every training question ranks its answer first
    # the poly-encoder term alone (no neighbours), too
    alone = ResponseSelector(RetrievalConfig(**TINY, epochs=30, lr=1e-2, neighbours=0)).fit(Q, A)
    assert alone.history[-1]["train_loss"] < 0.5 * alone.history[0]["train_loss"]
    scores = alone.score(Q, [pool] * len(Q))
    assert np.mean([pool[int(np.argmax(s))] == a for s, a in zip(scores, A, strict=True)]) >= 0.9  # chance 1/6
    # and that term is the network's poly-encoder score: question codes attended by each candidate's vector
    net = alone._net
    with torch.no_grad():
        ctx, _ = net.context(alone._pad(alone._ids(Q[:3])))
        direct = poly_scores(ctx, net(alone._pad(alone._ids(pool)))).numpy()
    np.testing.assert_allclose(np.stack(scores[:3]), direct, rtol=1e-5, atol=1e-6)


def test_scores_do_not_depend_on_the_other_candidates_and_select_searches_the_whole_pool(trained):
    pool = trained.pool
    full = trained.score(["잠이 와요", "비 와요"], [pool, pool])
    part = trained.score(["잠이 와요", "비 와요"], [pool[::-1], [pool[2], pool[0]]])
    np.testing.assert_allclose(part[0], full[0][::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(part[1], full[1][[2, 0]], rtol=1e-5, atol=1e-6)
    top = trained.select(["비 와요"], top_k=3)[0]
    best = np.argsort(-full[1], kind="stable")[:3]
    assert [a for a, _ in top] == [pool[j] for j in best]
    np.testing.assert_allclose([s for _, s in top], full[1][best], rtol=1e-5)


def test_save_load_round_trip_gives_identical_scores(trained, tmp_path):
    trained.save(tmp_path)
    back = ResponseSelector.load(tmp_path)
    assert isinstance(back._net, PolyEncoder) and back._net.codes.shape == (4, 16)
    qs = ["잠이 와요", "헤어졌어요", "배고프다"]
    for a, b in zip(back.score(qs, [trained.pool] * 3), trained.score(qs, [trained.pool] * 3), strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.select(qs, 3) == trained.select(qs, 3)
    (tmp_path / "encoder.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="polyencoder.*encoder.safetensors"):
        ResponseSelector.load(tmp_path)


def test_tfidf_weight_adds_the_tfidf_scorer_to_the_polyencoder():
    torch.set_num_threads(1)
    kw = dict(TINY, epochs=2, neighbours=3)
    alone = ResponseSelector(RetrievalConfig(**kw)).fit(Q, A)
    both = ResponseSelector(RetrievalConfig(**kw, tfidf_weight=2.0)).fit(Q, A)
    tfidf = ResponseSelector(RetrievalConfig(encoder="tfidf", neighbours=3)).fit(Q, A)
    cands = [["맑고 화창해요.", "일찍 주무세요.", "우산 챙기세요."]]
    expected = alone.score(["잠이 와요"], cands)[0] + 2.0 * tfidf.score(["잠이 와요"], cands)[0]
    np.testing.assert_allclose(both.score(["잠이 와요"], cands)[0], expected, rtol=1e-5)


@pytest.mark.parametrize("value, match", [(0, "greater than or equal to 1 \\(got 0\\)"), (4096, "less than or equal to 1024"),
                                          ("many", "valid integer")])
def test_config_rejects_bad_poly_codes(value, match):
    with pytest.raises(ConfigError, match=f"(?s)1 problem.*model.poly_codes: Input should be.*{match}"):
        _config(encoder="polyencoder", poly_codes=value)


def test_config_names_the_encoders_it_allows():
    with pytest.raises(ConfigError, match="(?s)1 problem.*encoder.*polyencoder"):
        _config(encoder="poly")
    cfg = _config(encoder="polyencoder", poly_codes=8)
    assert cfg.model.encoder == "polyencoder" and cfg.model.poly_codes == 8


def _config(**model):
    return validate_config({"name": "x", "data": {"path": "sample", "format": "chatbot_csv"},
                            "model": {"family": "retrieval", "task": "selection", **model}})


def test_neighbour_term_finds_the_nearest_training_questions_with_the_poly_score(trained):
    net, q = trained._net, ["잠이 와요"]
    with torch.no_grad():
        ctx, _ = net.context(trained._pad(trained._ids(q)))
        questions = net(trained._pad(trained._ids(trained.questions)))
        cands = net(trained._pad(trained._ids(trained.pool))).numpy()
        qq, qa = poly_scores(ctx, questions)[0].numpy(), poly_scores(ctx, torch.from_numpy(cands))[0].numpy()
    top = np.argsort(-qq)[:3]  # neighbours: 3
    w = np.exp((qq[top] - qq[top].max()) / 0.05)  # neighbour_temperature
    w /= w.sum()
    expected = qa + (cands @ cands[trained.answer_of[top]].T) @ w
    np.testing.assert_allclose(trained.score(q, [trained.pool])[0], expected, rtol=1e-4, atol=1e-5)
