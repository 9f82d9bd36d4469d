"""Conversation context end to end: a model trained with ``data.context_turns`` reads the earlier turns
that the Reply RPC (``ReplyRequest.context``) and the HTTP API (the messages before the input) carry,
and the conversation store keeps what was sent and how many turns the model read.

The data is made so that only context can tell the answers apart: every example asks the same
"그거 어때?" and the right reply names the fruit of the turn before it. A model that did not read the
context (or read it in another format than it was trained on) cannot answer all four.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import httpx
import pytest
from tests.serving_fakes import WAIT, ServerThread

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.config import validate_config
from chatforge.inference import load_model
from chatforge.serving.engine import Engine
from chatforge.serving.store import ConversationStore
from chatforge.training.run import run_experiment

pytestmark = pytest.mark.slow  # trains two small models (about 10 s each on a quiet machine)

FRUITS = ["사과", "바나나", "포도", "딸기"]
QUESTION = "그거 어때?"


def _answer(fruit: str) -> str:
    return f"{fruit} 맛있어요"


def _write_data(path: Path) -> Path:
    rows = []
    for _ in range(12):
        for fruit in FRUITS:
            rows.append({"question": QUESTION, "answer": _answer(fruit), "context": [f"{fruit} 좋아해", "그렇군요"]})
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def _train(tmp: Path, family: str) -> Path:
    model = {"family": family, "task": "generation", "dropout": 0.0}
    if family == "transformer":
        model.update(d_model=48, n_heads=2, d_ff=96, num_encoder_layers=1, num_decoder_layers=1)
    else:
        model.update(d_model=48, n_heads=2, d_ff=96, n_layers=2)
    tree = {
        "name": f"context-{family}",
        "seed": 0,
        "data": {"path": str(_write_data(tmp / "dialogues.jsonl")), "text_field": "question",
                 "response_field": "answer", "context_field": "context", "context_turns": 2,
                 "valid_fraction": 0.1, "test_fraction": 0.0},
        "tokenizer": {"vocab_size": 40, "on_vocab_too_large": "lower"},
        "model": model,
        "train": {"epochs": 40, "batch_size": 8, "lr": 5e-3, "max_source_len": 32,
                  "max_target_len": 16, "warmup_ratio": 0.0},
        "output": {"dir": str(tmp / "runs")},
        "tracking": {"enabled": False},
    }
    return run_experiment(validate_config(tree), run_dir=tmp / f"run-{family}").bundle_dir


@pytest.fixture(scope="module", params=["transformer", "gpt"])
def bundle(request, tmp_path_factory) -> Path:
    # The Transformer is served by the continuous batcher (its step model), GPT by the per-request
    # runner: context has to reach the model on both paths.
    return _train(tmp_path_factory.mktemp(f"ctx-{request.param}"), request.param)


def test_the_served_prompt_is_the_trained_format(bundle):
    gen = load_model(bundle, "chat")
    assert gen.context_turns == 2 and gen.info.metadata["context_turns"] == "2"
    tok = gen.tok
    ids, used = gen.encode_prompt(QUESTION, ["사과 좋아해", "그렇군요"])
    want = tok.encode("사과 좋아해") + [tok.turn_sep_id] + tok.encode("그렇군요") + [tok.turn_sep_id] + tok.encode(QUESTION)
    assert (ids, used) == (want, 2)
    # Only the latest context_turns are read, and only whole turns that fit the model's input.
    assert gen.encode_prompt(QUESTION, ["x", "사과 좋아해", "그렇군요"]) == (want, 2)
    gen.max_input_tokens = len(want) - 1
    assert gen.encode_prompt(QUESTION, ["사과 좋아해", "그렇군요"])[1] == 1


def _reply(client: ChatbotClient, text: str, **kw):
    chunks = list(client.reply_stream(text, **kw))
    return "".join(c.text for c in chunks[:-1]), chunks[-1]


def test_grpc_and_http_replies_follow_the_context_and_the_store_keeps_it(bundle, tmp_path):
    store = ConversationStore(f"sqlite:///{tmp_path / 'conversations.db'}")
    engine = Engine.from_bundles({"chat": bundle})
    with ServerThread(engine, http_port=0, store=store) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT) as client:
            for fruit in FRUITS:
                context = [("user", f"{fruit} 좋아해"), ("assistant", "그렇군요")]
                text, final = _reply(client, QUESTION, context=context, session_id=f"grpc-{fruit}")
                assert (text, final.context_turns) == (_answer(fruit), 2)
            # A beam-search request runs per request (not in the batcher) and reads the context too.
            text, final = _reply(client, QUESTION, context=[("user", "포도 좋아해"), ("assistant", "그렇군요")],
                                 num_beams=2)
            assert (text, final.context_turns) == (_answer("포도"), 2)
            # Without context the model cannot know the fruit; it still answers, having read no turn.
            assert _reply(client, QUESTION)[1].context_turns == 0
            with pytest.raises(ChatbotError) as bad_role:
                client.reply(QUESTION, context=[("system", "hi")])
            assert bad_role.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "context[0].role is 'system'; allowed: user, assistant" in bad_role.value.details
            with pytest.raises(ChatbotError) as empty:
                client.reply(QUESTION, context=[("user", "사과 좋아해"), ("assistant", " ")])
            assert "context[1].text is empty" in empty.value.details
            with pytest.raises(ChatbotError) as too_many:
                client.reply(QUESTION, context=[("user", "a")] * 65)
            assert "context holds 65 turns; allowed: at most 64" in too_many.value.details
        with httpx.Client(base_url=f"http://127.0.0.1:{st.server.http.port}", timeout=WAIT) as http:
            [card] = http.get("/v1/models").json()["data"]
            assert card["context_turns"] == 2
            for fruit in FRUITS:
                messages = [{"role": "system", "content": "친절하게"}, {"role": "user", "content": f"{fruit} 좋아해"},
                            {"role": "assistant", "content": "그렇군요"}, {"role": "user", "content": QUESTION}]
                r = http.post("/v1/chat/completions", json={"messages": messages, "user": f"http-{fruit}"})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["choices"][0]["message"]["content"] == _answer(fruit)
                assert body["chatforge"]["context_turns"] == 2
            long = http.post("/v1/chat/completions", json={"messages": [
                {"role": "user", "content": "x" * 100_000}, {"role": "user", "content": QUESTION}]})
            assert long.status_code == 400 and long.json()["error"]["param"] == "messages[0].content"
    assert store.flush(WAIT)
    rows = {r["session_id"]: r for r in store.iter_rows()}
    grpc_row = rows["grpc-사과"]
    assert grpc_row["context"] == [{"role": "user", "text": "사과 좋아해"}, {"role": "assistant", "text": "그렇군요"}]
    assert (grpc_row["context_turns"], grpc_row["reply"]) == (2, _answer("사과"))
    http_row = rows["http-딸기"]  # the system message is stored as sent; the model read the two turns
    assert http_row["context"] == [{"role": "system", "text": "친절하게"}, {"role": "user", "text": "딸기 좋아해"},
                                   {"role": "assistant", "text": "그렇군요"}]
    assert (http_row["context_turns"], http_row["reply"]) == (2, _answer("딸기"))
    store.close()
