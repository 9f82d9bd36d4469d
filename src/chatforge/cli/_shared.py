"""What every audience module of the CLI shares: the typer app, the consoles, flags and failing with one line."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from chatforge.settings import LOG_HANDLER_ATTR

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="chatforge: from a conversational corpus and one YAML file to a chatbot served over gRPC.")

console = Console()
err_console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=False)
        # Tagged as chatforge's own: `serve` replaces it with its JSON/human handler (configure_logging)
        # instead of logging every event twice.
        setattr(handler, LOG_HANDLER_ATTR, True)
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _flag(default: bool, decls: str, *short: str, help: str):
    """A boolean option as the ``--x/--no-x`` pair, without typer's ``<bool>`` type column:
    that column made users type ``--sample true``, which a flag does not accept."""
    assert decls.startswith("--") and "/--no-" in decls, decls
    return typer.Option(default, decls, *short, metavar="", help=help)


def _fail(message: str, code: int = 2) -> None:
    # soft_wrap: one line whatever the terminal width, so a log or a test sees the whole message. The message is
    # escaped: server errors, paths and user input can hold brackets that rich would read as markup ("[SEP]"
    # vanished) or fail on ("[/x]" raised MarkupError instead of printing the error).
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _check_seconds(option: str, value: float | None) -> None:
    """Deadlines and intervals must be finite and > 0: one line and exit 2 here, not the library's traceback (an
    infinite deadline failed every call at once with DEADLINE_EXCEEDED)."""
    if value is not None and not 0 < value < math.inf:
        _fail(f"{option} {value:g} is out of range; allowed: a finite number of seconds > 0, e.g. {option} 3")


@app.callback()
def _main(verbose: bool = _flag(False, "--verbose/--no-verbose", "-v", help="Debug logging.")) -> None:
    _setup_logging(verbose)


def _parse_models(bundles: list[Path], models: list[str]) -> dict[str, str]:
    """NAME=BUNDLE options and bare bundle folders (named after their run) -> {name: path}; used by serve and
    replies."""
    out: dict[str, str] = {}

    def add(name: str, path: str) -> None:  # the same name twice would silently keep only the last bundle
        if name in out:
            _fail(f"model name {name!r} is given twice ({out[name]} and {path}); name them apart with "
                  f"--model NAME=BUNDLE_PATH")
        out[name] = path

    for item in models:
        if "=" not in item:
            _fail(f"--model {item!r} must look like NAME=BUNDLE_PATH, e.g. chat=runs/demo/bundle")
        name, path = item.split("=", 1)
        add(name.strip(), path)
    for b in bundles:
        add(b.parent.name if b.name == "bundle" else b.name, str(b))
    if not out:
        _fail("give at least one bundle: chatforge serve runs/<run>/bundle, or --model NAME=PATH")
    for name, path in out.items():
        if not Path(path).is_dir():
            _fail(f"model {name!r}: bundle folder not found: {path}")
    return out
