"""Corpus readers: one function, :func:`read_examples`, from a file to a list of :class:`Example`.

Every reader shares one row policy (see :class:`_Collector`): whitespace is normalised and
counted, bad rows either raise a :class:`DataError` naming ``file:line``, what was wrong and
what is allowed (``on_error="raise"``) or are skipped and listed in the :class:`ReadReport`
(``on_error="skip"``). No row is ever dropped without being counted.

Formats:

``chatbot_csv``
    The songys/Chatbot_data layout: columns ``Q,A,label`` (also the layout of the shipped sample
    corpus). Labels are free-form unless ``allowed_labels`` is given; for ChatbotData.csv pass
    ``allowed_labels=CHATBOT_KR_LABELS``.
``clinc150``
    A JSON object of lists of ``[text, intent]`` pairs (Larson et al., EMNLP 2019); ``clinc_keys``
    picks the lists. Reads the upstream ``data_full.json`` and the trimmed ``data_full_trainval.json``.
``csv`` / ``tsv`` / ``jsonl``
    Generic files with a header row (csv/tsv) or one JSON object per line (jsonl). Field names are
    given, or inferred from common names (see ``TEXT_NAMES``, ``RESPONSE_NAMES``, ``LABEL_NAMES``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("auto", "chatbot_csv", "clinc150", "csv", "tsv", "jsonl")
ON_ERROR: tuple[str, ...] = ("raise", "skip")

# Inference order matters: the first name present in the header wins (case-insensitive). Korean headers too
# (질문 question, 문장 sentence, 발화 utterance; 답변/대답/응답 answer; 라벨/레이블 label, 의도 intent, 분류 category).
TEXT_NAMES: tuple[str, ...] = ("text", "question", "q", "utterance", "query", "input", "prompt", "질문", "문장", "발화")
RESPONSE_NAMES: tuple[str, ...] = ("response", "answer", "a", "reply", "output", "답변", "대답", "응답")
LABEL_NAMES: tuple[str, ...] = ("label", "intent", "category", "라벨", "레이블", "의도", "분류")

CHATBOT_CSV_COLUMNS: tuple[str, ...] = ("Q", "A", "label")
# The labels of songys/Chatbot_data: 0 daily life, 1 breakup (negative), 2 love (positive).
CHATBOT_KR_LABELS: tuple[str, ...] = ("0", "1", "2")


@dataclass(frozen=True)
class Example:
    """One training example: a text, and optionally a response (seq2seq) and/or a label (classification).

    ``source`` is ``"file:line"`` (for CLINC150 JSON, ``"file:key[index]"``) so any example can be
    traced back to where it was read.
    """

    text: str
    response: str | None = None
    label: str | None = None
    source: str = ""
    context: tuple[str, ...] = ()  # earlier turns of the conversation, oldest first (jsonl context_field)


@dataclass
class ReadReport:
    """What :func:`read_examples` did: rows seen, examples kept, rows normalised and rejected.

    ``problems`` holds one ``"file:line: what was wrong"`` entry per rejected row, so
    ``len(problems) == n_rejected``.
    """

    path: Path
    n_rows: int = 0
    n_examples: int = 0
    n_normalised: int = 0
    n_rejected: int = 0
    problems: list[str] = field(default_factory=list)
    format: str = ""


class DataError(ValueError):
    """A corpus file (or an argument about it) is not what chatforge can read."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """The corpus file does not exist; both a :class:`DataError` and a :class:`FileNotFoundError`."""


def _normalise(value: str) -> str:
    # Collapse every whitespace run (incl. newlines inside quoted CSV fields) to one space: the
    # real ChatbotData.csv has a label "2   ", and chat text is single-line by contract.
    return " ".join(value.split())


def _preview(values: Iterable[str], limit: int = 20) -> str:
    values = sorted(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


class _Collector:
    """Applies the shared row policy and builds the report."""

    def __init__(self, path: Path, fmt: str, on_error: str, allowed_labels: frozenset[str] | None):
        self.path = path
        self.on_error = on_error
        self.allowed_labels = allowed_labels
        self.examples: list[Example] = []
        self.report = ReadReport(path=path, format=fmt)

    def reject(self, where: str, what: str) -> None:
        message = f"{self.path}:{where}: {what}"
        if self.on_error == "raise":
            raise DataError(message)
        self.report.n_rejected += 1
        self.report.problems.append(message)

    def add(
        self,
        where: str,
        text: str,
        response: str | None,
        label: str | None,
        *,
        names: tuple[str, str | None, str | None],
        context: tuple[str, ...] = (),
    ) -> None:
        """Normalise and validate one row; ``names`` are the field names, for messages.

        A name of None means the file has no such field; a value of None under a present name
        means the row lacks it.
        """
        text_name, response_name, label_name = names
        raw = (text, response, label)
        text = _normalise(text)
        response = _normalise(response) if response is not None else None
        label = _normalise(label) if label is not None else None
        if not text:
            return self.reject(where, f"empty {text_name!r}; every row needs a non-empty text")
        if response_name is not None and not response:
            return self.reject(
                where, f"empty {response_name!r}; every row of a file with responses needs one"
            )
        if label_name is not None:
            if not label:
                return self.reject(where, f"empty {label_name!r}; every row of a labelled file needs a label")
            if self.allowed_labels is not None and label not in self.allowed_labels:
                return self.reject(
                    where, f"unknown label {label!r}; allowed labels: {_preview(self.allowed_labels)}"
                )
        if (text, response, label) != raw:
            self.report.n_normalised += 1
        self.examples.append(Example(text, response, label, source=f"{self.path.name}:{where}", context=context))

    def finish(self) -> tuple[list[Example], ReadReport]:
        self.report.n_examples = len(self.examples)
        if self.report.n_rejected:
            logger.warning(
                "%s: skipped %d of %d rows (first: %s)",
                self.path,
                self.report.n_rejected,
                self.report.n_rows,
                self.report.problems[0],
            )
        logger.info(
            "read %d examples from %s (%s; %d rows, %d normalised, %d rejected)",
            self.report.n_examples,
            self.path,
            self.report.format,
            self.report.n_rows,
            self.report.n_normalised,
            self.report.n_rejected,
        )
        return self.examples, self.report


def _decode_lines(data: bytes) -> tuple[list[str], dict[int, str]]:
    """Decode per physical line so one bad byte costs one row, not the file.

    Returns the lines (with their endings) and ``{line number: what was wrong}``.
    """
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM is not part of the first header name
        data = data[3:]
    lines: list[str] = []
    bad: dict[int, str] = {}
    hint: str | None = None
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            hint = _encoding_hint(data) if hint is None else hint
            bad[number] = (
                f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                f"files must be UTF-8 encoded{hint}"
            )
            lines.append(raw.decode("utf-8", errors="replace"))
    return lines, bad


def _encoding_hint(data: bytes) -> str:
    """What a file that is not UTF-8 most likely is, and how to convert it ("" when unsure). Korean files saved by
    Windows tools are CP949 (EUC-KR's superset); Excel's "Unicode text" is UTF-16 with a byte-order mark."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "; this one looks UTF-16 (it starts with a byte-order mark): convert it with `iconv -f utf-16 -t utf-8`"
    try:
        text = data.decode("cp949")
    except UnicodeDecodeError:
        return ""
    if any("\uac00" <= ch <= "\ud7a3" for ch in text):
        return "; this one reads as Korean in CP949/EUC-KR: convert it with `iconv -f cp949 -t utf-8 IN > OUT`"
    return ""


def _pick(header: Sequence[str], given: str | None, candidates: tuple[str, ...], what: str, path: Path):
    """The header name to use for one field: the given one (must exist) or the first common name."""
    if given is not None:
        if given not in header:
            raise DataError(
                f"{path}: {what} field {given!r} is not in the file; its fields are: {', '.join(header)}"
            )
        return given
    lowered = {h.lower(): h for h in header}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    return None


def _resolve_fields(header, text_field, response_field, label_field, path):
    text = _pick(header, text_field, TEXT_NAMES, "text", path)
    if text is None:
        raise DataError(
            f"{path}: cannot tell which field holds the text; fields are: {', '.join(header)}; "
            f"name one with text_field= or use one of: {', '.join(TEXT_NAMES)}"
        )
    response = _pick(header, response_field, RESPONSE_NAMES, "response", path)
    label = _pick(header, label_field, LABEL_NAMES, "label", path)
    chosen = [n for n in (text, response, label) if n is not None]
    if len(set(chosen)) != len(chosen):
        raise DataError(f"{path}: text, response and label fields must differ, got {chosen}")
    return text, response, label


def _read_delimited(
    path: Path,
    data: bytes,
    collector: _Collector,
    delimiter: str,
    fields: tuple[str | None, str | None, str | None] | None,
) -> None:
    """CSV/TSV with a header row (RFC 4180 quoting). ``fields`` None means chatbot_csv's fixed columns."""
    lines, bad = _decode_lines(data)
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}: empty file; expected a header row naming the columns") from None
    if 1 in bad:
        raise DataError(f"{path}:1: header row is {bad[1]}")
    if len(set(header)) != len(header):
        raise DataError(f"{path}:1: duplicate column names in header: {', '.join(header)}")
    if fields is None:
        if [h.lower() for h in header] != [c.lower() for c in CHATBOT_CSV_COLUMNS]:
            raise DataError(
                f"{path}:1: chatbot_csv needs the header {','.join(CHATBOT_CSV_COLUMNS)}, got {','.join(header)}"
            )
        names = tuple(header)
    else:
        names = _resolve_fields(header, *fields, path)
    index = {name: i for i, name in enumerate(header)}
    previous_end = reader.line_num
    for row in reader:
        # A record may span several physical lines (quoted newlines): report its first line.
        first, previous_end = previous_end + 1, reader.line_num
        if not row:  # a blank line holds no data; it is not a row
            continue
        collector.report.n_rows += 1
        bad_lines = [bad[n] for n in range(first, previous_end + 1) if n in bad]
        if bad_lines:
            collector.reject(str(first), bad_lines[0])
            continue
        if len(row) != len(header):
            collector.reject(
                str(first), f"expected {len(header)} columns ({','.join(header)}), got {len(row)}"
            )
            continue
        values = [row[index[n]] if n is not None else None for n in names]
        collector.add(str(first), values[0], values[1], values[2], names=names)


def _read_context(obj: dict, name: str) -> tuple[tuple[str, ...], str | None]:
    """A row's earlier turns: (turns, problem). Missing or null is a conversation's first turn."""
    value = obj.get(name)
    if value is None:
        return (), None
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        return (), (f"field {name!r} must be a list of strings (the earlier turns, oldest first), "
                    f"got {type(value).__name__}")
    turns = tuple(_normalise(t) for t in value)
    if not all(turns):
        return (), f"field {name!r} holds an empty turn; every earlier turn needs text"
    return turns, None


def _read_jsonl(path: Path, data: bytes, collector: _Collector, fields, context_field: str | None = None) -> None:
    lines, bad = _decode_lines(data)
    names: tuple[str, str | None, str | None] | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        collector.report.n_rows += 1
        where = str(number)
        if number in bad:
            collector.reject(where, bad[number])
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            collector.reject(
                where, f"not valid JSON ({e.msg} at column {e.colno}); each line must be one object"
            )
            continue
        if not isinstance(obj, dict):
            collector.reject(where, f"expected a JSON object, got {type(obj).__name__}")
            continue
        if names is None:
            # Field names come from the first object; later objects must carry the same fields.
            names = _resolve_fields(list(obj), *fields, path)
        values: list[str | None] = []
        problem = None
        for kind, name in zip(("text", "response", "label"), names, strict=True):
            if name is None:
                values.append(None)
                continue
            value = obj.get(name)
            if kind == "label" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # {"label": 1} is common; labels are strings everywhere else
            if value is None:
                problem = f"missing field {name!r}"
            elif not isinstance(value, str):
                problem = f"field {name!r} must be a string, got {type(value).__name__}"
            values.append(value if isinstance(value, str) else None)
            if problem:
                break
        context: tuple[str, ...] = ()
        if problem is None and context_field is not None:
            context, problem = _read_context(obj, context_field)
        if problem:
            collector.reject(where, problem)
            continue
        collector.add(where, values[0], values[1], values[2], names=names, context=context)


def _read_clinc(path: Path, data: bytes, collector: _Collector, keys: tuple[str, ...]) -> None:
    # JSON cannot be parsed around a bad byte, so encoding and syntax errors fail the whole file.
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: clinc150 expects a JSON object of lists, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{path}: clinc_keys {missing} not in the file; it has: {', '.join(sorted(obj))}")
    names = ("text", None, "intent")
    for key in keys:
        items = obj[key]
        if not isinstance(items, list):
            raise DataError(
                f"{path}:{key}: expected a list of [text, intent] pairs, got {type(items).__name__}"
            )
        for i, item in enumerate(items):
            collector.report.n_rows += 1
            where = f"{key}[{i}]"
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item)):
                collector.reject(
                    where, f"expected a [text, intent] pair of strings, got {json.dumps(item)[:80]}"
                )
                continue
            collector.add(where, item[0], None, item[1], names=names)


def _detect_format(path: Path, data: bytes) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "clinc150"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    first = ""
    for raw in data.splitlines():
        if raw.strip():
            first = raw.decode("utf-8", errors="replace").lstrip("\ufeff").strip()
            break
    if suffix == ".csv":
        header = [h.strip().lower() for h in next(csv.reader([first]), [])]
        return "chatbot_csv" if header == [c.lower() for c in CHATBOT_CSV_COLUMNS] else "csv"
    if first.startswith("{"):
        return "jsonl"
    if "\t" in first:
        return "tsv"
    if "," in first:
        return "csv"
    raise DataError(
        f"{path}: cannot detect the format from the extension {suffix or '(none)'!r} or the first line; "
        f"pass format= one of: {', '.join(FORMATS[1:])}"
    )


def read_examples(
    path: str | os.PathLike[str],
    format: str = "auto",
    *,
    text_field: str | None = None,
    response_field: str | None = None,
    label_field: str | None = None,
    context_field: str | None = None,
    clinc_keys: Sequence[str] = ("train", "oos_train"),
    on_error: str = "raise",
    allowed_labels: Iterable[str] | None = None,
) -> tuple[list[Example], ReadReport]:
    """Read a corpus file into examples, with a report of what was normalised and rejected.

    ``format`` is one of ``FORMATS``; ``"auto"`` picks by extension (``.jsonl``, ``.json`` ->
    clinc150, ``.tsv``, ``.csv`` -> chatbot_csv when the header is ``Q,A,label``) and otherwise by
    the first line. ``on_error="raise"`` raises :class:`DataError` on the first bad row;
    ``"skip"`` skips it and records it in ``report.problems``. ``allowed_labels`` restricts the
    labels of a labelled file: any other label is a bad row (e.g. ``CHATBOT_KR_LABELS``).
    ``context_field`` (jsonl only) names a field holding the conversation's earlier turns, a list of
    strings oldest first (missing or null: none); they become ``Example.context``.
    """
    path = Path(path)
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; known formats: {', '.join(FORMATS)}")
    if on_error not in ON_ERROR:
        raise DataError(f"unknown on_error {on_error!r}; allowed: {', '.join(ON_ERROR)}")
    if isinstance(clinc_keys, str):
        clinc_keys = (clinc_keys,)
    clinc_keys = tuple(clinc_keys)
    if not clinc_keys:
        raise DataError("clinc_keys is empty; name at least one list, e.g. ('train', 'oos_train')")
    if not path.exists():
        raise DataFileNotFoundError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path} is not a file; pass the path of a corpus file")
    data = path.read_bytes()
    fmt = _detect_format(path, data) if format == "auto" else format
    fields = (text_field, response_field, label_field)
    if fmt in ("chatbot_csv", "clinc150") and any(f is not None for f in fields):
        raise DataError(
            f"{fmt} has fixed fields; text_field, response_field and label_field apply to csv, tsv and jsonl"
        )
    if context_field is not None and fmt != "jsonl":
        raise DataError(f"context_field={context_field!r} applies to jsonl files (a list of earlier turns per "
                        f"line); {path} is {fmt}")
    if isinstance(allowed_labels, str):
        raise DataError(f"allowed_labels must be a collection of labels, not the string {allowed_labels!r}")
    labels = frozenset(allowed_labels) if allowed_labels is not None else None
    if labels is not None and not labels:
        raise DataError("allowed_labels is empty; pass the labels the file may use, or None for any")
    collector = _Collector(path, fmt, on_error, labels)
    if fmt == "chatbot_csv":
        _read_delimited(path, data, collector, ",", None)
    elif fmt == "csv":
        _read_delimited(path, data, collector, ",", fields)
    elif fmt == "tsv":
        _read_delimited(path, data, collector, "\t", fields)
    elif fmt == "jsonl":
        _read_jsonl(path, data, collector, fields, context_field)
    else:
        _read_clinc(path, data, collector, clinc_keys)
    return collector.finish()


def read_outliers(path: str | os.PathLike, key: str = "data.outliers") -> list[str]:
    """The non-empty lines of an outlier-exposure file (unlabelled out-of-domain sentences, one per line, e.g.
    CLINC150's ``all_wiki_sents.txt``), or a clear error naming the config ``key`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise DataFileNotFoundError(f"{key}: file not found: {p} (a text file of sentences, "
                                    "one per line, e.g. CLINC150's all_wiki_sents.txt)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{key}: {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [t.strip() for t in text.splitlines()]
    lines = [t for t in lines if t]
    if not lines:
        raise DataError(f"{key}: {p} has no sentences (one per line expected)")
    return lines
