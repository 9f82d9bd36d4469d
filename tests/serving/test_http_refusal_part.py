"""An earlier assistant turn given as OpenAI's refusal content part ({"type": "refusal", "refusal": ...}, valid input to
OpenAI's API and what its client echoes back) is read as that turn's text; it was a 400 "only text parts are
supported". Other part types (an image) are still refused, naming the part."""

from __future__ import annotations


def test_a_refusal_part_in_an_assistant_turn_is_its_text(served):
    _, http = served
    messages = [{"role": "user", "content": "hello"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot help with that."}]},
                {"role": "user", "content": "hello"}]
    r = http.post("/v1/chat/completions", json={"model": "echo", "max_tokens": 2, "messages": messages})
    assert r.status_code == 200, r.text
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    r = http.post("/v1/chat/completions", json={"model": "echo", "messages": [{"role": "user", "content": image}]})
    assert r.status_code == 400 and "part 0 is of type 'image_url'" in r.json()["error"]["message"], r.text
