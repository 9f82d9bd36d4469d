from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatforge.data import (
    CHATBOT_KR_LABELS,
    DataError,
    DataFileNotFoundError,
    Example,
    read_examples,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CHATBOT = SHARED / "chatbot_kr" / "ChatbotData.csv"
CLINC = SHARED / "clinc150" / "data_full_trainval.json"

needs_chatbot = pytest.mark.skipif(not CHATBOT.is_file(), reason=f"real data not present at {CHATBOT}")
needs_clinc = pytest.mark.skipif(not CLINC.is_file(), reason=f"real data not present at {CLINC}")


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


# --- real data -------------------------------------------------------------------------------


@needs_chatbot
def test_real_chatbot_data():
    examples, report = read_examples(CHATBOT, allowed_labels=CHATBOT_KR_LABELS)
    assert report.format == "chatbot_csv"
    assert report.n_rows == report.n_examples == len(examples) == 11_823
    assert report.n_rejected == 0 and report.problems == []
    assert {e.label for e in examples} == {"0", "1", "2"}
    # Exactly one row ("2   ") needs normalising, and it is counted.
    assert report.n_normalised == 1
    assert examples[0] == Example("12시 땡!", "하루가 또 가네요.", "0", "ChatbotData.csv:2")
    assert all(e.response for e in examples)


@needs_clinc
def test_real_clinc_train_and_val():
    train, report = read_examples(CLINC)
    assert report.format == "clinc150"
    assert report.n_examples == 15_100
    assert sum(e.label == "oos" for e in train) == 100
    val, report = read_examples(CLINC, clinc_keys=("val", "oos_val"))
    assert report.n_examples == 3_100 and sum(e.label == "oos" for e in val) == 100
    labels = {e.label for e in train} | {e.label for e in val}
    assert len(labels) == 151 and "oos" in labels
    assert all(e.response is None for e in train)
    assert train[0].source == "data_full_trainval.json:train[0]"


def test_clinc_upstream_layout_with_test_keys(tmp_path):
    data = {
        "train": [["hi there", "greet"]],
        "val": [["hello", "greet"]],
        "test": [["what's up", "greet"], ["book a flight", "book_flight"]],
        "oos_train": [["meaning of life", "oos"]],
        "oos_val": [],
        "oos_test": [["who won the cup", "oos"]],
    }
    path = write(tmp_path, "data_full.json", json.dumps(data))
    examples, report = read_examples(path, clinc_keys=("test", "oos_test"))
    assert [e.text for e in examples] == ["what's up", "book a flight", "who won the cup"]
    assert report.n_rows == 3
    with pytest.raises(DataError, match=r"'nope'.*it has: oos_test, oos_train, oos_val, test, train, val"):
        read_examples(path, clinc_keys=("nope",))


def test_clinc_bad_pairs_and_json(tmp_path):
    path = write(tmp_path, "c.json", json.dumps({"train": [["ok", "a"], ["only text"], [1, "b"]]}))
    with pytest.raises(DataError, match=r"c\.json:train\[1\]: expected a \[text, intent\] pair"):
        read_examples(path, clinc_keys=("train",))
    examples, report = read_examples(path, clinc_keys=("train",), on_error="skip")
    assert len(examples) == 1 and report.n_rejected == 2 and len(report.problems) == 2
    broken = write(tmp_path, "b.json", '{"train": [["a", "b"]\n')
    with pytest.raises(DataError, match=r"b\.json:\d+: not valid JSON"):
        read_examples(broken)


# --- generic formats and auto-detection ------------------------------------------------------


def test_generic_csv_infers_fields(tmp_path):
    path = write(tmp_path, "d.csv", 'question,answer,intent\nhow are you,"fine, thanks",smalltalk\n')
    examples, report = read_examples(path)
    assert report.format == "csv"
    assert examples == [Example("how are you", "fine, thanks", "smalltalk", "d.csv:2")]


def test_korean_headers_are_inferred_too(tmp_path):
    path = write(tmp_path, "k.csv", "번호,질문,답변,의도\n1,오늘 뭐 해?,집에서 쉬어요.,일상\n")
    examples, _ = read_examples(path)
    assert examples == [Example("오늘 뭐 해?", "집에서 쉬어요.", "일상", "k.csv:2")]
    path = write(tmp_path, "j.jsonl", '{"발화": "환불해 주세요", "분류": "환불"}\n')
    assert read_examples(path)[0] == [Example("환불해 주세요", None, "환불", "j.jsonl:1")]


def test_tsv_with_given_fields(tmp_path):
    path = write(tmp_path, "d.tsv", "id\tsentence\tcls\n1\tbook a table\trestaurant\n")
    examples, _ = read_examples(path, text_field="sentence", label_field="cls")
    assert examples == [Example("book a table", None, "restaurant", "d.tsv:2")]
    with pytest.raises(DataError, match=r"text field 'body' is not in the file; its fields are: id, sentence, cls"):
        read_examples(path, text_field="body")
    with pytest.raises(DataError, match=r"cannot tell which field holds the text.*text_field="):
        read_examples(path)


def test_jsonl(tmp_path):
    lines = [
        json.dumps({"utterance": "play jazz", "reply": "Playing jazz.", "label": 3}),
        "",
        json.dumps({"utterance": "stop", "reply": "Stopped.", "label": "4"}),
    ]
    path = write(tmp_path, "d.jsonl", "\n".join(lines) + "\n")
    examples, report = read_examples(path)
    assert report.format == "jsonl" and report.n_rows == 2
    assert examples[0] == Example("play jazz", "Playing jazz.", "3", "d.jsonl:1")
    assert examples[1].source == "d.jsonl:3"


def test_jsonl_bad_lines(tmp_path):
    lines = [
        json.dumps({"text": "a", "label": "x"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"text": "b"}),
        json.dumps({"text": 5, "label": "x"}),
    ]
    path = write(tmp_path, "d.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        read_examples(path)
    examples, report = read_examples(path, on_error="skip")
    assert [e.text for e in examples] == ["a"]
    assert report.n_rejected == 4
    assert report.problems[1].endswith("d.jsonl:3: expected a JSON object, got list")
    assert report.problems[2].endswith("d.jsonl:4: missing field 'label'")
    assert report.problems[3].endswith("d.jsonl:5: field 'text' must be a string, got int")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("a.csv", "Q,A,label\nq,a,0\n", "chatbot_csv"),
        ("a.csv", "\ufeffQ,A,label\nq,a,0\n", "chatbot_csv"),
        ("a.csv", "text,label\nq,0\n", "csv"),
        ("a.tsv", "text\tlabel\nq\t0\n", "tsv"),
        ("a.jsonl", '{"text": "q"}\n', "jsonl"),
        ("a.json", '{"train": [["q", "x"]], "oos_train": []}', "clinc150"),
        ("a.txt", '{"text": "q"}\n', "jsonl"),
        ("a.txt", "text\tlabel\nq\t0\n", "tsv"),
        ("a.data", "text,label\nq,0\n", "csv"),
    ],
)
def test_auto_detection(tmp_path, name, content, expected):
    _, report = read_examples(write(tmp_path, name, content))
    assert report.format == expected


def test_auto_detection_failure_lists_formats(tmp_path):
    path = write(tmp_path, "a.txt", "just words\n")
    with pytest.raises(DataError, match=r"cannot detect.*chatbot_csv, clinc150, csv, tsv, jsonl"):
        read_examples(path)


# --- messy rows ------------------------------------------------------------------------------

MESSY = (
    b"Q,A,label\n"
    b"fine,ok,0\n"  # 2
    b",no question,0\n"  # 3
    b"no answer, ,1\n"  # 4
    b"too,many,cols,2\n"  # 5
    b"bad \xff byte,x,1\n"  # 6
    b"unknown,label,7\n"  # 7
    b'"multi\nline",answer,2   \n'  # 8-9
    b"\n"  # 10: blank, not a row
    b"last,one,1\n"  # 11
)

MESSY_CASES = [
    (3, "empty 'Q'; every row needs a non-empty text"),
    (4, "empty 'A'; every row of a file with responses needs one"),
    (5, "expected 3 columns (Q,A,label), got 4"),
    (6, "not valid UTF-8 (byte 0xff at column 5); files must be UTF-8 encoded"),
    (7, "unknown label '7'; allowed labels: '0', '1', '2'"),
]


@pytest.mark.parametrize(("line", "message"), MESSY_CASES)
def test_messy_row_raises_with_file_and_line(tmp_path, line, message):
    # Keep the header, the bad row and a good row so each case raises on its own row.
    rows = MESSY.split(b"\n")
    path = write(tmp_path, "m.csv", b"\n".join([rows[0], rows[line - 1], rows[1]]) + b"\n")
    with pytest.raises(DataError) as info:
        read_examples(path, allowed_labels=CHATBOT_KR_LABELS)
    assert str(info.value) == f"{path}:2: {message}"


def test_messy_file_skip_counts_everything(tmp_path):
    path = write(tmp_path, "m.csv", MESSY)
    with pytest.raises(DataError, match=r"m\.csv:3: empty 'Q'"):
        read_examples(path, allowed_labels=CHATBOT_KR_LABELS)
    examples, report = read_examples(path, allowed_labels=CHATBOT_KR_LABELS, on_error="skip")
    assert [e.text for e in examples] == ["fine", "multi line", "last"]
    assert [e.source for e in examples] == ["m.csv:2", "m.csv:8", "m.csv:11"]
    assert examples[1].label == "2"
    assert report.n_rows == 8 and report.n_examples == 3 and report.n_rejected == 5
    assert report.n_normalised == 1  # "multi\nline" and "2   " are in the same row
    assert report.problems == [f"{path}:{line}: {message}" for line, message in MESSY_CASES]
    assert report.n_rows == report.n_examples + report.n_rejected


def test_empty_label_in_labelled_file(tmp_path):
    path = write(tmp_path, "l.csv", "text,label\nhello,\n")
    with pytest.raises(DataError, match=r"l\.csv:2: empty 'label'; every row of a labelled file needs a label"):
        read_examples(path)


def test_labels_free_without_allowed_labels(tmp_path):
    path = write(tmp_path, "s.csv", "Q,A,label\nhi,hello,greeting\n")
    examples, _ = read_examples(path)
    assert examples[0].label == "greeting"


def test_header_problems(tmp_path):
    with pytest.raises(DataError, match=r"empty file; expected a header row"):
        read_examples(write(tmp_path, "e.csv", ""), "csv")
    with pytest.raises(DataError, match=r"d\.csv:1: duplicate column names"):
        read_examples(write(tmp_path, "d.csv", "text,text\na,b\n"))
    with pytest.raises(DataError, match=r"chatbot_csv needs the header Q,A,label, got text,label"):
        read_examples(write(tmp_path, "c.csv", "text,label\na,b\n"), "chatbot_csv")


# --- bad arguments ---------------------------------------------------------------------------


def test_unknown_format_lists_known(tmp_path):
    path = write(tmp_path, "a.csv", "text\nx\n")
    with pytest.raises(DataError, match=r"unknown data format 'xml'; known formats: auto, chatbot_csv, clinc150"):
        read_examples(path, "xml")


def test_bad_arguments(tmp_path):
    path = write(tmp_path, "a.csv", "Q,A,label\nx,y,0\n")
    with pytest.raises(DataError, match=r"unknown on_error 'ignore'; allowed: raise, skip"):
        read_examples(path, on_error="ignore")
    with pytest.raises(DataError, match=r"chatbot_csv has fixed fields"):
        read_examples(path, text_field="Q")
    with pytest.raises(DataError, match=r"allowed_labels must be a collection"):
        read_examples(path, allowed_labels="012")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataFileNotFoundError, match=r"data file not found: .*nope\.csv") as info:
        read_examples(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)
    with pytest.raises(DataError, match=r"is not a file"):
        read_examples(tmp_path)


def test_jsonl_context_field_reads_the_earlier_turns(tmp_path):
    path = write(tmp_path, "d.jsonl", "\n".join([
        json.dumps({"q": "그거 어때?", "a": "맛있어요", "turns": ["사과 좋아해", " 그렇군요 "]}, ensure_ascii=False),
        json.dumps({"q": "안녕", "a": "안녕하세요"}, ensure_ascii=False),  # a first turn: no context
        json.dumps({"q": "x", "a": "y", "turns": None}),
    ]) + "\n")
    examples, _ = read_examples(path, text_field="q", response_field="a", context_field="turns")
    assert [e.context for e in examples] == [("사과 좋아해", "그렇군요"), (), ()]
    assert read_examples(path, text_field="q", response_field="a")[0][0].context == ()  # not asked for


@pytest.mark.parametrize("turns, problem", [
    ("사과 좋아해", "field 'turns' must be a list of strings (the earlier turns, oldest first), got str"),
    (["ok", 3], "field 'turns' must be a list of strings (the earlier turns, oldest first), got list"),
    (["ok", "  "], "field 'turns' holds an empty turn; every earlier turn needs text"),
])
def test_jsonl_context_field_rejects_what_is_not_a_list_of_turns(tmp_path, turns, problem):
    path = write(tmp_path, "d.jsonl", json.dumps({"q": "a", "a": "b", "turns": turns}) + "\n")
    with pytest.raises(DataError, match="d.jsonl:1: " + problem.replace("(", r"\(").replace(")", r"\)")):
        read_examples(path, text_field="q", response_field="a", context_field="turns")
    examples, report = read_examples(path, text_field="q", response_field="a", context_field="turns", on_error="skip")
    assert examples == [] and report.n_rejected == 1


def test_context_field_is_for_jsonl_only(tmp_path):
    path = write(tmp_path, "d.csv", "question,answer\nq,a\n")
    with pytest.raises(DataError, match="context_field='turns' applies to jsonl files"):
        read_examples(path, context_field="turns")


@pytest.mark.parametrize(("encoding", "hint"), [
    ("cp949", "reads as Korean in CP949/EUC-KR: convert it with `iconv -f cp949 -t utf-8 IN > OUT`"),
    ("utf-16", "looks UTF-16 (it starts with a byte-order mark): convert it with `iconv -f utf-16 -t utf-8`"),
])
def test_a_korean_file_in_another_encoding_names_it_and_how_to_convert(tmp_path, encoding, hint):
    text = "Q,A,label\n12시 땡!,하루가 또 가네요.,0\n1지망 학교 떨어졌어,위로해 드립니다.,0\n"
    path = write(tmp_path, "k.csv", text.encode(encoding))
    with pytest.raises(DataError, match="not valid UTF-8") as info:
        read_examples(path, allowed_labels=CHATBOT_KR_LABELS)
    assert str(info.value).endswith(hint)


def test_a_stray_bad_byte_in_a_utf8_file_gets_no_encoding_guess(tmp_path):
    path = write(tmp_path, "u.csv", "Q,A,label\n12시 땡!,하루가 또 가네요.,0\n".encode() + b"bad \xff byte,x,1\n")
    with pytest.raises(DataError) as info:
        read_examples(path, allowed_labels=CHATBOT_KR_LABELS)
    assert str(info.value).endswith("files must be UTF-8 encoded")
