"""``chatforge conversations export --out turns.csv`` writes CSV: without --format the file's suffix decides.

The format defaulted to jsonl whatever --out said, so ``--out turns.csv`` wrote JSON lines into a .csv file (a
spreadsheet or ``pandas.read_csv`` then read one column of JSON) and printed "exported N turns to turns.csv"."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.serving.store import ConversationStore, Turn


@pytest.fixture
def store_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'conv.db'}"
    with ConversationStore(url) as s:
        s.record(Turn(session_id="s-1", user_text="안녕", reply="반가워요", path="retrieval",
                      context=[{"role": "user", "text": "hi"}]))
    return url


def _export(*args: str):
    return CliRunner().invoke(app, ["conversations", "export", *args], env={"COLUMNS": "300"})


@pytest.mark.parametrize("name", ["turns.csv", "TURNS.CSV"])
def test_a_csv_suffix_writes_csv(store_url, tmp_path, name):
    out = tmp_path / name
    r = _export("--url", store_url, "--out", str(out))
    assert r.exit_code == 0, r.output
    [row] = list(csv.DictReader(out.open(encoding="utf-8", newline="")))
    assert (row["session_id"], row["user_text"], row["path"]) == ("s-1", "안녕", "retrieval")


@pytest.mark.parametrize("name", ["turns.jsonl", "turns.txt", "turns"])
def test_other_suffixes_keep_jsonl(store_url, tmp_path, name):
    out = tmp_path / name
    r = _export("--url", store_url, "--out", str(out))
    assert r.exit_code == 0, r.output
    [row] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert (row["session_id"], row["path"], row["context"]) == ("s-1", "retrieval", [{"role": "user", "text": "hi"}])


def test_an_explicit_format_still_wins(store_url, tmp_path):
    out = tmp_path / "turns.csv"
    r = _export("--url", store_url, "--out", str(out), "--format", "jsonl")
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[0])["user_text"] == "안녕"
