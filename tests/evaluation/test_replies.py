"""``chatforge replies``: the reply table and the hybrid column (evaluation.replies)."""

from __future__ import annotations

import json

import pytest

from chatforge.config import validate_config
from chatforge.evaluation.evaluate import EvaluationError
from chatforge.evaluation.metrics import corpus_chrf
from chatforge.evaluation.replies import (
    DEFAULT_FALLBACK,
    Replies,
    choose_min_familiarity,
    choose_retrieval_threshold,
    hybrid,
    reply_table,
)
from chatforge.serving.policy import ReplyPolicy
from chatforge.training.run import run_experiment

DATA = {"path": "sample", "format": "chatbot_csv", "valid_fraction": 0.1, "test_fraction": 0.1}


def test_hybrid_takes_retrieval_at_or_above_the_threshold():
    sel = Replies(["r1", "r2", "r3"], [0.9, 0.5, 0.7])
    gen = Replies(["g1", "g2", "g3"], None)
    assert hybrid(sel, gen, 0.7) == (["r1", "g2", "r3"], ["retrieval", "generation", "retrieval"])


def test_the_familiarity_guard_sends_unfamiliar_questions_to_the_fallback_first():
    sel = Replies(["r1", "r2", "r3"], [0.9, 0.5, 0.99], familiarity=[-3.0, -4.0, -9.0])
    gen = Replies(["g1", "g2", "g3"], None)
    assert hybrid(sel, gen, 0.7, min_familiarity=-6.0) == (["r1", "g2", DEFAULT_FALLBACK],
                                                           ["retrieval", "generation", "fallback"])
    assert hybrid(sel, gen, 0.7)[1] == ["retrieval", "generation", "retrieval"]  # no guard: as before
    with pytest.raises(ValueError, match="needs the selector's familiarity"):
        hybrid(Replies(["r"], [0.9]), Replies(["g"]), 0.7, min_familiarity=-6.0)


def test_the_guard_threshold_is_a_low_quantile_of_validation():
    fam = [-float(i) for i in range(1, 101)]  # -1 .. -100
    t = choose_min_familiarity(fam, 0.05)
    assert t in fam and sum(f < t for f in fam) == 4  # an observed value; 4 % strictly below, 5 % at or below
    assert choose_min_familiarity(fam, 0.0) is None
    with pytest.raises(EvaluationError, match=r"quantile 0.5 is out of range; allowed: \[0, 0.5\)"):
        choose_min_familiarity(fam, 0.5)


def test_threshold_is_the_one_with_the_best_chrf():
    refs = ["맑아요 오늘", "비가 와요", "배고파요"]
    # retrieval is right on the confident ones (scores 0.9, 0.8), the generator on the unsure one (0.1)
    sel = Replies(["맑아요 오늘", "비가 와요", "엉뚱한 답"], [0.9, 0.8, 0.1])
    gen = Replies(["몰라요", "몰라요", "배고파요"], None)
    t = choose_retrieval_threshold(sel, gen, refs)
    assert 0.1 < t <= 0.8
    assert corpus_chrf(hybrid(sel, gen, t)[0], refs) == pytest.approx(100.0)
    # a generator that is never better: ties go to the lowest threshold (retrieve always)
    assert choose_retrieval_threshold(sel, Replies(["x", "y", "엉뚱한 답"]), refs) == pytest.approx(0.1)


@pytest.mark.slow
def test_reply_table_compares_models_on_the_same_questions(tmp_path):
    sel_cfg = validate_config({"name": "sel", "seed": 0, "data": DATA, "tracking": {"enabled": False},
                               "model": {"family": "retrieval", "task": "selection", "neighbours": 5}})
    gen_cfg = validate_config({
        "name": "gen", "seed": 0, "data": DATA, "tracking": {"enabled": False},
        "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": {"family": "transformer", "task": "generation", "d_model": 16, "n_heads": 2,
                  "num_encoder_layers": 1, "num_decoder_layers": 1, "d_ff": 32},
        "train": {"epochs": 1, "max_steps": 4, "batch_size": 16, "max_source_len": 16, "max_target_len": 8},
    })
    sel = run_experiment(sel_cfg, run_dir=tmp_path / "sel").bundle_dir
    gen = run_experiment(gen_cfg, run_dir=tmp_path / "gen").bundle_dir
    res = reply_table({"retrieval": sel, "seq2seq": gen}, hybrid_of=("retrieval", "seq2seq"), n=5,
                      out_dir=tmp_path / "out", max_examples=20)
    assert set(res["figures"]) == {"retrieval", "seq2seq", "hybrid"}
    assert res["hybrid"]["threshold_chosen_on"] == "valid"
    rows = json.loads((tmp_path / "out" / "replies.json").read_text(encoding="utf-8"))["table"]
    assert len(rows) == 5 and all({"question", "reference", "retrieval", "seq2seq", "hybrid"} <= set(r) for r in rows)
    page = (tmp_path / "out" / "replies.html").read_text(encoding="utf-8")
    assert page.count("<tr>") == 5 + 1 + 3 + 1  # table rows + header, figure rows + header
    assert rows[0]["question"] in (tmp_path / "out" / "replies.md").read_text(encoding="utf-8")
    policy = ReplyPolicy.from_yaml(tmp_path / "out" / "policy.yaml")  # the hybrid column, ready to serve
    assert (policy.retriever, policy.retrieval_threshold) == ("retrieval", res["hybrid"]["threshold"])
    # the familiarity guard, chosen on valid (1 % quantile by default), is served as it was measured
    assert policy.min_familiarity == res["hybrid"]["min_familiarity"] < 0
    assert 0.0 <= res["figures"]["hybrid"]["fallback_share"] < 0.5
    unguarded = reply_table({"retrieval": sel, "seq2seq": gen}, hybrid_of=("retrieval", "seq2seq"), n=5,
                            out_dir=tmp_path / "unguarded", max_examples=20, familiarity_quantile=0.0)
    assert unguarded["hybrid"]["min_familiarity"] is None and unguarded["figures"]["hybrid"]["fallback_share"] == 0
    assert "min_familiarity" not in (tmp_path / "unguarded" / "policy.yaml").read_text(encoding="utf-8")
    assert policy.generator == "seq2seq"  # the generator the threshold was chosen with, not the server's default
    with pytest.raises(EvaluationError, match="must be one of the named bundles"):
        reply_table({"retrieval": sel}, hybrid_of=("retrieval", "seq2seq"), out_dir=tmp_path / "x")
    # Decoding options reach the generation model (a 4-step model loops: blocking repeats changes its replies),
    # are recorded, and a bad one is named.
    plain = reply_table({"seq2seq": gen}, out_dir=tmp_path / "plain", max_examples=20)
    tuned = reply_table({"seq2seq": gen}, out_dir=tmp_path / "tuned", max_examples=20,
                        decoding={"no_repeat_ngram_size": 1})
    assert tuned["decoding"] == {"no_repeat_ngram_size": 1} and plain["decoding"] == {}
    assert tuned["figures"]["seq2seq"]["repeat_3_rate"] == 0.0
    assert [r["seq2seq"] for r in tuned["table"]] != [r["seq2seq"] for r in plain["table"]]
    with pytest.raises(EvaluationError, match="no_repeat_ngram_size=-1 is out of range"):
        reply_table({"seq2seq": gen}, out_dir=tmp_path / "bad", decoding={"no_repeat_ngram_size": -1})
    with pytest.raises(EvaluationError, match="unknown decoding option.s. beam_width; allowed: max_new_tokens, .*num_beams"):
        reply_table({"seq2seq": gen}, out_dir=tmp_path / "bad", decoding={"beam_width": 2})
