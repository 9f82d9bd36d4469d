"""A bundle's ``drafts/replies.json`` edited by hand or damaged: every way it can be wrong is refused at load with a
:class:`DraftIndexError` naming the file (a bundle load turns it into its own error), never another exception from
deep in the parser or a crash later in serving; and whatever a :class:`DraftIndex` saves loads again."""

from __future__ import annotations

import json

import pytest

from chatforge import drafts
from chatforge.drafts import MAX_REPLY_TOKENS, REPLIES_FILE, DraftIndex, DraftIndexError

EOS = 2


def _doc(**over):
    return json.dumps({"format": 1, "eos_id": EOS, "replies": [[5, 6, EOS]], **over})


@pytest.mark.parametrize("content, message", [
    # a token id of 5000 digits: Python's int parsing limit raises a plain ValueError inside json.loads
    ('{"format": 1, "eos_id": 2, "replies": [[' + "9" * 5000 + "]]}", "cannot read the draft datastore"),
    # arrays nested deeper than the interpreter's stack: RecursionError inside json.loads
    ('{"format": 1, "eos_id": 2, "replies": ' + "[" * 200_000 + "]" * 200_000 + "}",
     "cannot read the draft datastore .JSON nested too deeply"),
    (b"\xff\xfe not utf-8", "cannot read the draft datastore"),
    (_doc(eos_id=99), r"eos_id 99 is not a token id in \[0, 8\)"),
    (_doc(eos_id=-1), r"eos_id -1 is not a token id in \[0, 8\)"),
    (_doc(eos_id=True), "eos_id must be an integer"),
    (_doc(eos_id=2.0), "eos_id must be an integer"),
    (_doc(replies={"0": [5]}), "replies a list of token id lists"),
    (_doc(replies=[[5], 7]), "reply 1 must be a list"),
    (_doc(replies=[[5], [[6]]]), "reply 1 must be a list"),
    (_doc(replies=[[5.0]]), "reply 0 must be a list"),
    (_doc(replies=[[5, None]]), "reply 0 must be a list"),
    (_doc(replies=[[8]]), r"reply 0 must be a list .* in \[0, 8\)"),
    (_doc(replies=[[5] * (MAX_REPLY_TOKENS + 1)]), f"reply 0 must be a list of at most {MAX_REPLY_TOKENS}"),
    ("[]", "not a draft datastore of format 1"),
    ("null", "not a draft datastore of format 1"),
    ("", "cannot read the draft datastore"),
], ids=["huge-int", "deep-nesting", "not-utf8", "eos-past-vocab", "eos-negative", "eos-bool", "eos-float", "replies-object", "reply-int", "reply-nested", "token-float", "token-null", "token-past-vocab", "reply-too-long", "top-level-list", "top-level-null", "empty-file"])
def test_a_hostile_datastore_is_refused_with_a_draft_index_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / REPLIES_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DraftIndexError, match=message) as e:
        DraftIndex.load(tmp_path, vocab_size=8)
    assert str(path) in str(e.value)


def test_more_replies_than_allowed_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(drafts, "MAX_REPLIES", 2)
    (tmp_path / REPLIES_FILE).write_text(_doc(replies=[[5], [6], [7]]))
    with pytest.raises(DraftIndexError, match="3 replies; at most 2 are allowed"):
        DraftIndex.load(tmp_path, vocab_size=8)


def test_a_missing_file_or_a_folder_in_its_place_is_refused(tmp_path):
    with pytest.raises(DraftIndexError, match="cannot read the draft datastore"):
        DraftIndex.load(tmp_path)
    (tmp_path / REPLIES_FILE).mkdir()
    with pytest.raises(DraftIndexError, match="cannot read the draft datastore"):
        DraftIndex.load(tmp_path)


def test_what_a_datastore_saves_always_loads_again(tmp_path, monkeypatch):
    """Training replies are not bounded: one longer than the loader's limit, or more replies than it takes, must
    not write a bundle that cannot be loaded. The stored datastore keeps what the loader accepts (a reply's first
    MAX_REPLY_TOKENS tokens: more than any reply may generate), and drafts from it as before."""
    monkeypatch.setattr(drafts, "MAX_REPLIES", 3)
    long = [5, 6, *([7] * MAX_REPLY_TOKENS), EOS]
    idx = DraftIndex([long, [5, 6, 8, EOS], [9, EOS], [10, EOS]], eos_id=EOS)
    assert len(idx) == 3 and len(idx.replies[0]) == MAX_REPLY_TOKENS
    idx.save(tmp_path)
    back = DraftIndex.load(tmp_path, vocab_size=16)
    assert back.replies == idx.replies
    assert back.draft(0, 4) == idx.draft(0, 4) == [5, 6, 7, 7]


def test_a_datastore_too_big_to_be_a_reply_set_is_refused_by_its_size_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(drafts, "MAX_FILE_BYTES", 100)
    (tmp_path / REPLIES_FILE).write_text(_doc(replies=[[5, EOS]] * 40), encoding="utf-8")
    monkeypatch.setattr(drafts.json, "loads", lambda *_: pytest.fail("the file was parsed"))
    with pytest.raises(DraftIndexError, match=r"bytes; allowed: a draft datastore of at most 100 bytes"):
        DraftIndex.load(tmp_path)


def test_the_tokens_of_all_replies_are_bounded_when_saved_and_when_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(drafts, "MAX_TOTAL_TOKENS", 6)
    idx = DraftIndex([[5, 6, EOS], [7, EOS], [8, 9, EOS]], eos_id=EOS)
    assert idx.replies == [[5, 6, EOS], [7, EOS]]  # the third would pass 6 tokens in all
    idx.save(tmp_path)
    assert DraftIndex.load(tmp_path, vocab_size=16).replies == idx.replies
    (tmp_path / REPLIES_FILE).write_text(_doc(replies=[[5, 6, EOS], [7, EOS], [8, 9, EOS]]),
                                         encoding="utf-8")
    with pytest.raises(DraftIndexError, match="more than 6 tokens in all"):
        DraftIndex.load(tmp_path, vocab_size=16)
