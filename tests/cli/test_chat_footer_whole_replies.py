"""``chatforge chat`` says who chose a whole reply (retrieval, scripted, fallback) instead of "(0 tokens, stop)".

A selection model's answer printed its text, then "(0 tokens, stop)": the reply looked generated and empty at once,
and nothing said it came from retrieval, which model, or its score (what ReplyFinal carries)."""

from __future__ import annotations

from tests.serving_fakes import FakeClassifier, FakeGenerator, ServerThread
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.inference import ModelInfo
from chatforge.serving.engine import Engine, PipelineConfig


class Selector:
    def __init__(self):
        self.info = ModelInfo(name="tfidf", family="retrieval", task="selection", version="3")

    @property
    def version(self) -> str:
        return self.info.version

    def select(self, text: str) -> tuple[str, float]:
        return "골라 온 답", 0.875


def _chat(target: str, *args: str) -> str:
    r = CliRunner().invoke(app, ["chat", target, *args], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())


def test_a_retrieval_reply_names_its_path_model_and_score():
    engine = Engine({"chat": FakeGenerator("chat")}, {}, retrievers={"tfidf": Selector()}, continuous_batching=False)
    with ServerThread(engine) as st:
        st.wait_serving()
        out = _chat(st.target, "-m", "hello", "--model", "tfidf")
        generated = _chat(st.target, "-m", "hello", "--max-new-tokens", "2")
    assert "골라 온 답" in out
    assert "(retrieval by tfidf v3, score 0.875)" in out and "0 tokens" not in out
    assert "(2 tokens, length)" in generated  # a generated reply keeps its count


def test_an_out_of_scope_fallback_says_so():
    engine = Engine({"chat": FakeGenerator("chat")}, {"intents": FakeClassifier()}, continuous_batching=False,
                    pipeline=PipelineConfig("intents", "Sorry.", threshold=0.9))
    with ServerThread(engine) as st:
        st.wait_serving()
        out = _chat(st.target, "-m", "hello")
    assert "Sorry." in out and "(fallback by intents v1, out of scope)" in out
