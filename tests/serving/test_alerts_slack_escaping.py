"""Slack reads ``&``, ``<`` and ``>`` in a message's text as control characters (``<!channel>`` notifies everyone
in the channel, ``<url|text>`` is a link; https://api.slack.com/reference/surfaces/formatting#escaping). An
exception message can quote what a client sent, so an alert must show those characters, never act on them."""

from __future__ import annotations

import json

from chatforge.serving.alerts import Alert, exception_details, slack_payload

HOSTILE = "<!channel> pay <https://evil.example|here> & <@U123>"


def _texts(payload: dict) -> list[str]:
    (attachment,) = payload["attachments"]
    return [payload["text"], attachment["fallback"], *(b["text"]["text"] for b in attachment["blocks"])]


def _caught() -> KeyError:
    try:
        {}[HOSTILE]
    except KeyError as e:
        return e
    raise AssertionError("unreachable")


def test_a_client_quoted_in_an_exception_cannot_ping_the_channel_or_plant_a_link():
    d = exception_details(_caught())
    alert = Alert(key="k", title=f"KeyError {HOSTILE}", description=f"exception: KeyError: {d['message']}\n"
                  f"source: {d['source']}\nfile: <unknown>")
    texts = _texts(slack_payload(alert, "srv-<1>"))
    for text in texts:
        assert "<" not in text and ">" not in text, text
    body = "\n".join(texts)
    assert "&lt;!channel&gt; pay &lt;https://evil.example|here&gt; &amp; &lt;@U123&gt;" in body
    assert "file: &lt;unknown&gt;" in body
    assert "[srv-&lt;1&gt;]" in texts[0]
    json.dumps(slack_payload(alert, "srv"))  # still a JSON body


def test_text_without_control_characters_is_unchanged():
    texts = _texts(slack_payload(Alert(key="k", title="ValueError in Reply", description="line 12: x = 1"), "srv"))
    assert texts[0] == "[srv] CRITICAL: ValueError in Reply"
    assert texts[3] == "```line 12: x = 1```"


def test_a_long_description_is_cut_within_slacks_limit_never_inside_an_entity():
    for pad in range(5):
        texts = _texts(slack_payload(Alert(key="k", title="t", description="x" * pad + "<" * 3000), "srv"))
        details = texts[3].removeprefix("```").removesuffix("```")
        assert len(details) <= 2900
        assert details.endswith("&lt;") and details.lstrip("x").replace("&lt;", "") == ""
