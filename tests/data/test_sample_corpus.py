from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict

from chatforge.data import read_examples, sample_corpus_path

HANGUL = re.compile(r"[\uac00-\ud7a3]")


def is_korean(text: str) -> bool:
    return bool(HANGUL.search(text))


def test_sample_is_shipped_and_readable():
    path = sample_corpus_path()
    assert path.is_file() and path.name == "chitchat.csv"
    assert (path.parent / "README.md").read_text(encoding="utf-8").count("Apache-2.0") >= 1
    examples, report = read_examples(path)
    assert report.format == "chatbot_csv"
    assert report.n_rejected == 0 and report.n_normalised == 0  # the shipped file is clean
    assert 600 <= len(examples) <= 1000


def test_sample_is_rfc4180_with_the_chatbot_header():
    raw = sample_corpus_path().read_bytes()
    raw.decode("utf-8")  # raises if not UTF-8
    assert not raw.startswith(b"\xef\xbb\xbf")
    assert raw.startswith(b"Q,A,label\r\n")
    rows = list(csv.reader(raw.decode("utf-8").splitlines()))
    assert all(len(r) == 3 for r in rows)


def test_sample_content_sanity():
    examples, _ = read_examples(sample_corpus_path())
    labels = Counter(e.label for e in examples)
    assert 25 <= len(labels) <= 40
    per_language: dict[tuple[str, bool], int] = Counter((e.label, is_korean(e.text)) for e in examples)
    for label in labels:
        assert per_language[(label, True)] >= 8, f"{label}: too few Korean questions"
        assert per_language[(label, False)] >= 8, f"{label}: too few English questions"
    # Answers are in the question's language.
    assert all(is_korean(e.text) == is_korean(e.response) for e in examples)
    # No question appears twice (so none can have two different answers or labels).
    questions = Counter(e.text.lower() for e in examples)
    assert [q for q, n in questions.items() if n > 1] == []
    # A consistent answer per intent: at most two variants per language.
    answers: dict[tuple[str, bool], set[str]] = defaultdict(set)
    for e in examples:
        answers[(e.label, is_korean(e.text))].add(e.response)
    assert max(len(v) for v in answers.values()) <= 2
    # Distinct intents answer differently.
    firsts = [sorted(v)[0] for v in answers.values()]
    assert len(set(firsts)) == len(firsts)
