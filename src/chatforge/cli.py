"""The `chatforge` command line: parse, call the library, render with rich. No logic here."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="chatforge: from a conversational corpus and one YAML file to a chatbot served over gRPC.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train and inspect SentencePiece tokenizers.")
data_app = typer.Typer(no_args_is_help=True, help="Get the public data sets.")
config_app = typer.Typer(no_args_is_help=True, help="Check experiment configs.")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(console=err_console, show_path=False, rich_tracebacks=False))
    root.setLevel(level)
    for noisy in ("urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    _setup_logging(verbose)


# --------------------------------------------------------------------------- config
@config_app.command("check")
def config_check(config: Path = typer.Argument(..., help="Experiment YAML file."),
                 set_: list[str] = typer.Option([], "--set", help="Override: key.path=value (repeatable).")):
    """Validate a config and print it fully resolved (defaults filled in)."""
    from chatforge.config import ConfigError, load_config

    try:
        cfg = load_config(config, set_)
    except ConfigError as e:
        _fail(str(e))
    console.print(cfg.to_yaml(), highlight=False)


# ------------------------------------------------------------------------ tokenizer
@tokenizer_app.command("train")
def tokenizer_train(
    data: Path = typer.Option(..., "--data", help="Corpus file (ChatbotData CSV, CLINC150 JSON, CSV/TSV/JSONL)."),
    out: Path = typer.Option(Path("tokenizer.model"), "--out", help="Where to write the .model file."),
    vocab_size: int = typer.Option(8000, help="Vocabulary size."),
    model_type: str = typer.Option("unigram", help="unigram or bpe."),
    fmt: str = typer.Option("auto", "--format", help="auto, chatbot_csv, clinc150, csv, tsv, jsonl."),
    lower_if_too_large: bool = typer.Option(False, help="Use the largest workable vocab size if too large."),
):
    """Train a SentencePiece tokenizer with chatforge's special tokens."""
    from chatforge.data import DataError, read_examples
    from chatforge.tokenizer import Tokenizer, TokenizerError

    try:
        examples, report = read_examples(data, format=fmt)
        texts = [e.text for e in examples] + [e.response for e in examples if e.response]
        tok = Tokenizer.train(texts, vocab_size=vocab_size, model_type=model_type,
                              on_vocab_too_large="lower" if lower_if_too_large else "error")
    except (DataError, TokenizerError, FileNotFoundError) as e:
        _fail(str(e))
    tok.save(out)
    console.print(f"wrote [bold]{out}[/] (vocab {tok.vocab_size}, {len(texts)} sentences, "
                  f"special ids {tok.special})", highlight=False)


# ---------------------------------------------------------------------------- train
class _RichProgress:
    """Trainer callback rendering a progress bar with loss and ETA."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = None
        self.epoch_info = ""

    def on_train_start(self, trainer, total_steps):
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, info="")

    def on_step_end(self, trainer, step, logs):
        self.progress.update(self.task, completed=step,
                             info=f"epoch {trainer.epoch} loss {logs['loss']:.3f} {self.epoch_info}")

    def on_epoch_end(self, trainer, epoch, logs):
        parts = [f"{k}={logs[k]:.3f}" for k in ("valid_loss", "valid_accuracy") if k in logs]
        self.epoch_info = " ".join(parts)

    def on_train_end(self, trainer):
        self.progress.stop()


@app.command()
def train(
    config: Path = typer.Argument(..., help="Experiment YAML file."),
    set_: list[str] = typer.Option([], "--set", help="Override: key.path=value (repeatable), e.g. train.epochs=3."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Write the run here instead of output.dir/<name>-<time>."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Train the model an experiment config describes; writes a run folder with its bundle."""
    from chatforge.config import ConfigError, load_config
    from chatforge.data import DataError
    from chatforge.tokenizer import TokenizerError
    from chatforge.training.run import run_experiment
    from chatforge.training.tasks import TaskDataError

    try:
        cfg = load_config(config, set_)
        callbacks = [_RichProgress(err_console)] if progress else []
        result = run_experiment(cfg, callbacks=callbacks, run_dir=run_dir)
    except (ConfigError, DataError, TokenizerError, TaskDataError) as e:
        _fail(str(e))
    m = result.metrics
    table = Table(title=f"run {result.run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("num_parameters", "train_examples", "steps", "train_seconds", "best_epoch", "valid_loss",
              "valid_accuracy", "test_loss", "test_accuracy"):
        if k in m:
            v = m[k]
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    for s in m.get("samples", [])[:5]:
        console.print(f"[dim]Q:[/] {s['question']}\n[dim]ref:[/] {s['reference']}\n[bold]bot:[/] {s['reply']}\n",
                      highlight=False)
    console.print(f"bundle: [bold]{result.bundle_dir}[/]", highlight=False)


@app.command()
def generate(
    bundle: Path = typer.Argument(..., help="Bundle folder (runs/<run>/bundle)."),
    text: list[str] = typer.Argument(..., help="Message(s) to answer."),
    max_new_tokens: int = typer.Option(64),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0),
    top_k: int = typer.Option(0),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(None),
):
    """Answer messages with a bundle locally, without a server (classifiers print the label)."""
    from chatforge.bundle import BundleError
    from chatforge.decoding import GenerationOptions
    from chatforge.inference import load_model

    try:
        model = load_model(bundle, name="local")
        opts = GenerationOptions(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed).validate()
    except (BundleError, ValueError) as e:
        _fail(str(e))
    for t in text:
        if hasattr(model, "stream"):
            reply = "".join(d.text for d in model.stream(t, opts))
            console.print(f"[dim]you:[/] {t}\n[bold]bot:[/] {reply}", highlight=False)
        else:
            p = model.classify([t])[0]
            console.print(f"[dim]text:[/] {t}\n[bold]label:[/] {p.label} ({p.score:.3f})", highlight=False)


# ---------------------------------------------------------------------------- serve
def _parse_models(bundles: list[Path], models: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in models:
        if "=" not in item:
            _fail(f"--model {item!r} must look like NAME=BUNDLE_PATH, e.g. chat=runs/demo/bundle")
        name, path = item.split("=", 1)
        out[name.strip()] = path
    for b in bundles:
        out[b.parent.name if b.name == "bundle" else b.name] = str(b)
    if not out:
        _fail("give at least one bundle: chatforge serve runs/<run>/bundle, or --model NAME=PATH")
    for name, path in out.items():
        if not Path(path).is_dir():
            _fail(f"model {name!r}: bundle folder not found: {path}")
    return out


@app.command()
def serve(
    bundles: list[Path] = typer.Argument(None, help="Bundle folders to serve (named after their run)."),
    model: list[str] = typer.Option([], "--model", help="NAME=BUNDLE_PATH (repeatable)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; 0.0.0.0 for all."),
    port: int = typer.Option(50051, help="Port; 0 picks a free one (see --port-file)."),
    port_file: Path = typer.Option(None, help="Write the bound port here once the server is SERVING."),
    grace: float = typer.Option(10.0, help="Seconds in-flight calls get to finish after SIGTERM."),
):
    """Serve bundles over gRPC (Chatbot service, health, reflection) until SIGTERM/SIGINT."""
    from chatforge.serving.server import run_server

    named = _parse_models(bundles or [], model)
    code = run_server(named, host=host, port=port, grace=grace, port_file=str(port_file) if port_file else None)
    raise typer.Exit(code or 0)


# ----------------------------------------------------------------------------- chat
@app.command()
def chat(
    target: str = typer.Argument(..., help="HOST:PORT of a chatforge server."),
    message: list[str] = typer.Option([], "--message", "-m", help="Send these and exit (else interactive)."),
    model: str = typer.Option(None, help="Model name on the server (default: its generator)."),
    session_id: str = typer.Option(None, help="Conversation id sent with each turn."),
    max_new_tokens: int = typer.Option(64),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0),
    top_k: int = typer.Option(0),
    top_p: float = typer.Option(1.0),
    timeout: float = typer.Option(30.0, help="Deadline per reply, seconds."),
):
    """Chat with a server in the terminal; replies print as they stream."""
    from chatforge.serving.client import ChatbotClient, ChatbotError

    opts = dict(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p)

    def turn(client: ChatbotClient, text: str) -> None:
        console.print("[bold green]bot>[/] ", end="")
        final = None
        for chunk in client.reply_stream(text, model=model, session_id=session_id, **opts):
            if chunk.text:
                console.print(chunk.text, end="", highlight=False, markup=False)
            if chunk.finish_reason:
                final = chunk
        console.print()
        if final is not None:
            console.print(f"[dim]({final.completion_tokens} tokens, {final.finish_reason})[/]")

    try:
        with ChatbotClient(target, timeout=timeout) as client:
            if message:
                for m in message:
                    console.print(f"[bold cyan]you>[/] {m}", highlight=False)
                    turn(client, m)
                return
            console.print("[dim]Type a message; Ctrl-D or /quit to leave.[/]")
            while True:
                try:
                    text = console.input("[bold cyan]you>[/] ")
                except (EOFError, KeyboardInterrupt):
                    console.print()
                    break
                if text.strip() in ("/quit", "/exit"):
                    break
                if text.strip():
                    try:
                        turn(client, text)
                    except ChatbotError as e:
                        err_console.print(f"[red]{e}[/]")
    except ChatbotError as e:
        _fail(str(e), code=1)


@app.command()
def health(
    target: str = typer.Argument(..., help="HOST:PORT"),
    service: str = typer.Option("", help="Service name; '' is the whole server, chatforge.v1.Chatbot readiness."),
    timeout: float = typer.Option(3.0, help="Seconds to wait for an answer."),
):
    """Check gRPC health like grpc_health_probe: exit 0 only when SERVING."""
    from chatforge.serving.client import ChatbotClient, ChatbotError

    try:
        with ChatbotClient(target, timeout=timeout) as client:
            status = client.health(service)
    except ChatbotError as e:
        err_console.print(f"{target}: {e}")
        raise typer.Exit(1) from None
    console.print(f"{target} {service or '(server)'}: {status}")
    raise typer.Exit(0 if status == "SERVING" else 1)


# ----------------------------------------------------------------------------- data
@data_app.command("download")
def data_download(
    name: str = typer.Argument(..., help="Data set: chatbot-kr or clinc150."),
    dest: Path = typer.Option(Path("data"), help="Folder to write into (a subfolder per data set)."),
    from_path: Path = typer.Option(None, "--from", help="Copy from a local folder instead of downloading."),
):
    """Fetch a public data set with sha256 verification (or copy it from --from)."""
    from chatforge.data import DataError, download

    progress = Progress(TextColumn(f"[bold]{name}"), BarColumn(), TextColumn("{task.completed}/{task.total} bytes"),
                        TimeRemainingColumn(), console=err_console, transient=True)
    with progress:
        task = progress.add_task(name, total=None)

        def cb(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        try:
            out = download(name, dest, from_path=from_path, progress=cb)
        except (DataError, OSError) as e:
            _fail(str(e))
    console.print(f"{name}: ready in [bold]{out}[/]", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
