"""The reply table (replies.md, replies.html) shows questions and replies as the text they are.

Found by a review: `_md_cell` only turned `|` into `\\|` and newlines into spaces, so a `\\|` in a reply still split
its cell (the backslash became escaped), backticks, `*`, `~~`, `[..](..)` and `<script>` were rendered as markup,
and model names in the header were not escaped at all. The Markdown is parsed here as GFM (markdown-it, tables on)
and every cell must come back as its text, one cell per column."""

from __future__ import annotations

import pytest

from chatforge.evaluation.replies import _FIGURE_COLUMNS, _html, _markdown

markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py (a dependency of rich) parses the GFM table")

HOSTILE = [
    "a | b",
    "a \\| b",
    "back\\slash at the end\\",
    "line one\nline two\r\nline three\rfour\u2028five",
    "`code` and ``double``",
    "*em* **strong** _under_ __dunder__ ~~strike~~",
    "<script>alert(1)</script> <b>bold</b> <!-- c -->",
    "[link](http://evil.example) ![img](x.png) <http://auto.example>",
    "&amp; &#124; &lt; $x^2$",
    "# not a heading",
    "> not a quote",
    "- not a list",
    "val_accuracy a_b_c",
]


def _result(texts: list[str], model: str) -> dict:
    fig = {c: 0.5 for c in _FIGURE_COLUMNS}
    return {"data": "/tmp/data | `x`.csv", "split": "test", "n_questions": len(texts),
            "figures": {model: {"family": "gpt", "task": "generation", **fig}},
            "table": [{"question": t, "reference": t[::-1], model: t + " | reply"} for t in texts]}


def _tables(md: str) -> list[list[list[str]]]:
    """Every table of ``md`` as rows of cell texts, the header first; `<br>` (the one HTML the table writes
    itself) read back as a newline."""
    parser = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"])
    tables, row, cell = [], None, None
    for tok in parser.parse(md):
        if tok.type == "table_open":
            tables.append([])
        elif tok.type == "tr_open":
            row = []
            tables[-1].append(row)
        elif tok.type in ("th_open", "td_open"):
            cell = []
        elif tok.type in ("th_close", "td_close"):
            row.append("".join(cell))
            cell = None
        elif tok.type == "inline" and cell is not None:
            for child in tok.children:
                if child.type in ("text", "text_special"):
                    cell.append(child.content)
                elif child.type == "html_inline" and child.content == "<br>":
                    cell.append("\n")
                elif child.type == "html_inline" and child.content == "<!-- -->":
                    pass  # what md_text puts where GitHub would start a link, mention or emoji: no text
                else:  # emphasis, code, link, image, strikethrough, raw HTML: markup the text injected
                    raise AssertionError(f"cell rendered markup {child.type} ({child.markup or child.content!r})")
    return tables


def _one_line_breaks(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n")


def test_markdown_cells_read_back_as_their_text():
    model = "my|`model`*"
    md = _markdown(_result(HOSTILE, model), [model])
    figures, replies = _tables(md)
    assert figures[0] == ["model", *_FIGURE_COLUMNS] and figures[1][0] == model
    assert replies[0] == ["question", "reference", model]
    assert len(replies) == 1 + len(HOSTILE)
    for text, row in zip(HOSTILE, replies[1:], strict=True):
        assert row == [_one_line_breaks(t) for t in (text, text[::-1], text + " | reply")]
    # the title names the data file as text too
    assert md.splitlines()[0] == "# Replies on data &#124; \\`x\\`.csv (test, 13 questions)"


def test_html_page_escapes_every_cell():
    model = "<i>m</i>"
    page = _html(_result(HOSTILE, model), [model])
    assert "<script>" not in page and "<b>" not in page and "<i>" not in page and "<!--" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;i&gt;m&lt;/i&gt;" in page
    assert "&amp;amp;" in page  # an entity in a reply is shown as written, not decoded
    assert page.count("<tr>") == 1 + 1 + 1 + len(HOSTILE)


URLS = ["see http://example.com now", "HTTPS://X.COM/a?b=c", "www.example.com", "(WWW.Example.kr/path)",
        "ftp://files.example/x", "[link](http://evil.example) <http://auto.example>"]


def test_a_url_in_a_reply_is_text_not_a_link_where_github_renders_the_table():
    """GFM autolinks a bare URL or www. address; in a table of model output a reader could follow a link the model
    made up. Rendered with cmark-gfm (the renderer GitHub runs), no cell holds a link and each shows its text. (A bare
    e-mail address, a mention, an issue number, an emoji code: the next test.)"""
    import html

    import cmarkgfm  # the dev extra: a missing renderer fails here rather than skipping the check
    md = _markdown(_result(URLS, "gpt-chat"), ["gpt-chat"])
    rendered = cmarkgfm.github_flavored_markdown_to_html(md)
    assert "<a " not in rendered
    for text in URLS:
        assert html.escape(text, quote=False) in rendered
    (tables,) = [t for t in _tables(md) if len(t) > len(URLS)]
    assert [(row[0], row[2]) for row in tables[1:]] == [(t, t + " | reply") for t in URLS]  # markdown-it reads them back


GITHUB_REFERENCES = ["write to help@example.com or Kim.Lee+x@mail.example.kr", "thanks @octocat and @a_b",
                     "fixed in #12, see #3", "good :smile: :+1: :thumbsup:", "at 10:30:45 on 2026-12-07",
                     "email:a@b.co #x @ # : end"]


def test_an_email_mention_issue_number_or_emoji_code_in_a_reply_stays_text_where_github_renders_the_table():
    """GitHub links a bare e-mail address (cmark-gfm's autolink, which no backslash escape stops), an @name (a user) and a
    #number (an issue of the repository showing the file), and turns :name: into an emoji. Rendered with cmark-gfm no
    cell holds a link; in the rendered HTML no run of text between tags or comments holds an "@name", "#12" or ":name:"
    (GitHub's mention, issue and emoji filters read text nodes); and the text reads back unchanged."""
    import re

    import cmarkgfm
    md = _markdown(_result(GITHUB_REFERENCES, "gpt-chat"), ["gpt-chat"])
    rendered = cmarkgfm.github_flavored_markdown_to_html(md)
    assert "<a " not in rendered and "mailto:" not in rendered
    for run in re.split(r"<[^>]*>", rendered):  # text between tags, comments included (cmark-gfm shows them as tags)
        assert not re.search(r"@[A-Za-z0-9_]|#\d|:[A-Za-z0-9_+-]+:", run), run
    (tables,) = [t for t in _tables(md) if len(t) > len(GITHUB_REFERENCES)]
    assert [(row[0], row[2]) for row in tables[1:]] == [(t, t + " | reply") for t in GITHUB_REFERENCES]
