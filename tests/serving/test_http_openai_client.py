"""The official ``openai`` package (a client no one here wrote) against chatforge's HTTP surface."""

from __future__ import annotations

import pytest
from tests.serving_fakes import WAIT, FakeGenerator, ServerThread, TinyGPTGenerator, make_engine

openai = pytest.importorskip("openai", reason="the openai package is a dev dependency (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def client():
    engine = make_engine(generators={"echo": FakeGenerator("echo", tokens=("안녕", "하세요", "!")),
                                     "other": FakeGenerator("other")})
    with ServerThread(engine, http_port=0) as st:
        st.wait_serving()
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{st.server.http.port}/v1", api_key="unused",
                          timeout=WAIT, max_retries=0)
        yield c
        c.close()


def test_list_models(client):
    page = client.models.list()
    models = {m.id: m for m in page.data}
    assert set(models) == {"echo", "other", "intents"}
    assert all(isinstance(m, openai.types.Model) and m.object == "model" for m in models.values())
    assert models["echo"].owned_by == "chatforge"
    assert models["echo"].model_extra["version"] == "1" and models["echo"].model_extra["task"] == "generation"
    assert client.models.retrieve("other").id == "other"


def test_non_streamed_completion(client):
    out = client.chat.completions.create(model="echo", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "안녕"}])
    assert isinstance(out, openai.types.chat.ChatCompletion)
    assert out.choices[0].message.content == "안녕하세요!"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "stop"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (1, 3, 4)
    assert out.model == "echo"


def test_streamed_completion(client):
    stream = client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True}, max_tokens=3)
    chunks = list(stream)
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    text = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert text == ["Hel", "lo", " there"]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 3


def test_errors_raise_the_matching_exception_types(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "gpt-4o" in e.value.message
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert e.value.body["param"] == "temperature"


def test_json_mode_and_tools_are_refused_not_answered_as_plain_text(client):
    """The client's structured-output and tool-calling paths get a BadRequestError naming the parameter, where
    they used to get a plain-text completion the caller then failed to parse."""
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="echo", messages=msgs, response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format" and "not supported" in e.value.message
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="echo", messages=msgs, tools=[tool])
    assert e.value.body["param"] == "tools"
    # what the client sends when a caller sets these to their defaults is still served
    out = client.chat.completions.create(model="echo", messages=msgs, response_format={"type": "text"},
                                         frequency_penalty=0, presence_penalty=0, logprobs=False)
    assert out.choices[0].message.content == "안녕하세요!"


def test_bad_api_key_is_authentication_error():
    with ServerThread(make_engine(), http_port=0, auth=_auth()) as st:
        st.wait_serving()
        base = f"http://127.0.0.1:{st.server.http.port}/v1"
        with openai.OpenAI(base_url=base, api_key="wrong", timeout=WAIT, max_retries=0) as bad, \
                pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with openai.OpenAI(base_url=base, api_key="k1", timeout=WAIT, max_retries=0) as good:
            assert [m.id for m in good.models.list().data][0] == "echo"


def _auth():
    from chatforge.serving.security import ApiKeyAuth

    return ApiKeyAuth(["k1"])


def test_frequency_and_presence_penalties_reach_the_model():
    """OpenAI's frequency_penalty and presence_penalty, sent by the official client, decode as chatforge's own
    decoding does alone with them (``logit - count * frequency - seen * presence`` on the reply's tokens).
    They were refused with a 400 before."""
    from chatforge.decoding import GenerationOptions

    gen = TinyGPTGenerator("gpt")
    with ServerThread(make_engine(generators={"gpt": gen}), http_port=0) as st:
        st.wait_serving()
        with openai.OpenAI(base_url=f"http://127.0.0.1:{st.server.http.port}/v1", api_key="unused",
                           timeout=WAIT, max_retries=0) as client:
            replies = []
            for kw in ({}, {"frequency_penalty": 1.5}, {"presence_penalty": 2.0, "frequency_penalty": -0.5}):
                out = client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "counted"}],
                                                     max_tokens=14, extra_body={"min_tokens": 14}, **kw)
                expected = gen.reference("counted", GenerationOptions(max_new_tokens=14, min_new_tokens=14, **kw))
                assert out.choices[0].message.content == "".join(f"<{t}>" for t in expected), kw
                replies.append(out.choices[0].message.content)
            assert len(set(replies)) == 3  # each penalty changed the reply
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "x"}],
                                               frequency_penalty=2.5)
            assert e.value.body["param"] == "frequency_penalty"
