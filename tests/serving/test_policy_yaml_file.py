"""The reply policy file is read like the experiment config: one line naming file and line for a YAML error or a key
given twice (before: a PyYAML traceback out of `chatforge serve`, or the later key silently won), and `1e-3` is a
number."""

from __future__ import annotations

import pytest

from chatforge.serving.policy import PolicyError, ReplyPolicy


def test_an_exponent_threshold_is_a_number(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text("retriever: r\nretrieval_threshold: 5e-1\nfallback_reply: 모르겠어요\n")
    assert ReplyPolicy.from_yaml(p).retrieval_threshold == pytest.approx(0.5)


@pytest.mark.parametrize("content, message", [
    ("retriever: r\n\tgenerate: true\n", r"policy\.yaml:2:1: not valid YAML: found character '\\t'"),
    ("retriever: r\nretriever: s\n", r"policy\.yaml:2:1: not valid YAML: key 'retriever' is given twice"),
])
def test_a_broken_policy_file_is_one_policy_error_naming_the_line(tmp_path, content, message):
    p = tmp_path / "policy.yaml"
    p.write_text(content)
    with pytest.raises(PolicyError, match=message) as e:
        ReplyPolicy.from_yaml(p)
    assert "\n" not in str(e.value)


def test_a_policy_file_that_is_not_utf8_says_so(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_bytes("fallback_reply: 모르겠어요\n".encode("cp949"))
    with pytest.raises(PolicyError, match="not UTF-8 text"):
        ReplyPolicy.from_yaml(p)
