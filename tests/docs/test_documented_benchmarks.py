"""What README.md and docs/**/*.md tell a reader to open or run is there as written.

Every ``benchmarks/results/...`` and ``docs/...`` path the docs cite exists (or, for an ``--out`` stem, its
``.md``/``.json`` does); every relative Markdown link resolves; every ``python benchmarks/<script>.py ...``
command in a code span or block names a script that exists and parses with that script's own argparse parser
(flags, choices, types); every ``chatforge bench``/``chatforge loadtest`` flag is one the command takes and every
``--cases`` name is a case.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys

import pytest
from tests.benchmarks.conftest import load
from tests.deploy_helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _text(path) -> str:
    return path.read_text(encoding="utf-8")


def _code(text: str) -> list[str]:
    """Each line of every fenced block (backslash continuations joined) and every inline code span (whitespace,
    newlines included, collapsed: a span may wrap across lines)."""
    out: list[str] = []

    def fence(m: re.Match) -> str:
        out.extend(m.group(1).replace("\\\n", " ").splitlines())
        return ""

    rest = re.sub(r"^```[^\n]*\n(.*?)^```", fence, text, flags=re.S | re.M)
    out.extend(" ".join(m.group(1).split()) for m in re.finditer(r"`([^`]+)`", rest))
    return out


def _cited_paths() -> list[tuple[str, str]]:
    found = set()
    for doc in DOCS:
        for m in re.finditer(r"(?<![\w/.-])((?:benchmarks/results|docs)/[A-Za-z0-9_./-]+)(?![*<{\w-])", _text(doc)):
            path = m.group(1).rstrip(".,:;/")
            if path.endswith("-"):  # a pattern's prefix (`serving-*.json`) cut at the wildcard
                continue
            found.add((doc.relative_to(REPO).as_posix(), path))
    return sorted(found)


def _commands(pattern: str) -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCS:
        for span in _code(_text(doc)):
            for m in re.finditer(pattern, span):
                words = shlex.split(m.group(2).split("#")[0].replace("[", " ").replace("]", " "))
                found.append((doc.relative_to(REPO).as_posix(), m.group(1), words))
    return found


SCRIPT_COMMANDS = _commands(r"python (?:-m )?benchmarks/(\w+)\.py((?:[^|;&`]|\|\|)*)")
CLI_COMMANDS = _commands(r"chatforge (bench|loadtest)\b([^|;&`]*)")


def test_the_docs_cite_result_files_and_commands():
    # the extractors below find something: an extractor that finds nothing would pass every check
    assert len(_cited_paths()) > 50
    assert len({name for _, name, _ in SCRIPT_COMMANDS}) > 15
    assert {name for _, name, _ in CLI_COMMANDS} == {"bench", "loadtest"}


@pytest.mark.parametrize(("doc", "path"), _cited_paths(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_cited_path_exists(doc, path):
    p = REPO / path
    # `--out benchmarks/results/clinc150` names the stem the script writes .md and .json beside
    assert p.exists() or p.with_suffix(".md").exists() or p.with_suffix(".json").exists(), \
        f"{doc} cites {path}, which is not in the repository"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_markdown_link_resolves(doc):
    broken = []
    for m in re.finditer(r"\]\(([^)#\s]+)", _text(doc)):
        target = m.group(1)
        if not re.match(r"[a-z]+:", target) and not (doc.parent / target).exists():
            broken.append(target)
    assert not broken, f"{doc.name} links to missing files: {broken}"


def test_every_benchmark_script_the_docs_name_exists():
    named = set()
    for doc in DOCS:
        named |= set(re.findall(r"(?<![\w/])benchmarks/(\w+)\.py", _text(doc)))
    missing = sorted(n for n in named if not (REPO / "benchmarks" / f"{n}.py").is_file())
    assert not missing, f"the docs name benchmark scripts that do not exist: {missing}"


class _Parser(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _parser_of(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The script's own parser: run its main() until it calls parse_args, and stop there."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # grpc_path imports serving_bench
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])
    mod = load(name)

    def stop(self, *a, **k):
        raise _Parser(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(_Parser) as caught:
        mod.main()
    monkeypatch.undo()
    return caught.value.parser


@pytest.mark.parametrize(("doc", "name", "argv"), SCRIPT_COMMANDS,
                         ids=[f"{d}:{n}:{i}" for i, (d, n, _) in enumerate(SCRIPT_COMMANDS)])
def test_documented_benchmark_command_parses(doc, name, argv, monkeypatch):
    assert (REPO / "benchmarks" / f"{name}.py").is_file(), f"{doc} runs benchmarks/{name}.py, which does not exist"
    parser = _parser_of(name, monkeypatch)
    errors = []
    monkeypatch.setattr(parser, "error", lambda message: (errors.append(message), sys.exit(2)))
    try:
        parser.parse_args(argv)
    except SystemExit:
        pass
    assert not errors, f"{doc}: `python benchmarks/{name}.py {shlex.join(argv)}` does not parse: {errors[0]}"


@pytest.mark.parametrize(("doc", "name", "argv"), CLI_COMMANDS,
                         ids=[f"{d}:{n}:{i}" for i, (d, n, _) in enumerate(CLI_COMMANDS)])
def test_documented_chatforge_command_flags_exist(doc, name, argv):
    import typer.main

    from chatforge.cli import app
    from chatforge.cli.bench import BENCH_CASES

    command = typer.main.get_command(app).commands[name]
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    for i, word in enumerate(argv):
        flag = word.split("=")[0]
        if flag.startswith("-") and len(flag) > 1:
            assert flag in options, f"{doc}: `chatforge {name}` has no {flag} (it takes {sorted(options)})"
        if flag == "--cases" and i + 1 < len(argv) and "=" not in word:
            unknown = set(argv[i + 1].split(",")) - set(BENCH_CASES)
            assert not unknown, f"{doc}: `chatforge bench --cases {argv[i + 1]}`: {unknown} not in {BENCH_CASES}"
