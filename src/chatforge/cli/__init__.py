"""The `chatforge` command line: parse, call the library, render with rich. No logic here.

Every command imports the library inside its own function, never at the top of this module: the
client commands (health, chat, loadtest, top) must not pay for torch, scikit-learn or MLflow
(seconds of imports; a container HEALTHCHECK runs `chatforge health` with a 4 s timeout).
tests/test_client.py checks that they import none of them.
"""

from __future__ import annotations

import logging
import os
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

from chatforge.settings import LOG_HANDLER_ATTR

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
    # soft_wrap: one line whatever the terminal width, so a log or a test sees the whole message.
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _check_seconds(option: str, value: float | None) -> None:
    """Deadlines and intervals must be > 0: one line and exit 2 here, not the library's traceback."""
    if value is not None and not value > 0:
        _fail(f"{option} {value:g} is out of range; allowed: seconds > 0, e.g. {option} 3")


# Client-side credentials, shared by chat, health and loadtest (and the key by top). The key is
# read from CHATFORGE_API_KEY when --api-key is not given (a command-line argument shows in
# `ps`); it is never printed: no default is shown, and errors never include it.
API_KEY_ENV = "CHATFORGE_API_KEY"


def _api_key_option():
    return typer.Option(None, "--api-key", envvar=API_KEY_ENV, show_envvar=True, show_default=False,
                        help="API key sent as 'authorization: Bearer <key>' (for servers started with "
                             f"--api-keys-file or CHATFORGE_API_KEYS); prefer the {API_KEY_ENV} variable.")


def _tls_option():
    return _flag(False, "--tls/--no-tls", help="Connect over TLS (implied by --tls-ca/--tls-cert); "
                                               "trusts the system CAs unless --tls-ca is given.")


def _pem_option(flag: str, help: str):
    return typer.Option(None, flag, exists=True, dir_okay=False, readable=True, help=help)


def _tls_ca_option():
    return _pem_option("--tls-ca", "CA certificate (PEM) to trust for the server's certificate.")


def _tls_cert_option():
    return _pem_option("--tls-cert", "Client certificate (PEM) for mutual TLS (server's --tls-client-ca).")


def _tls_key_option():
    return _pem_option("--tls-key", "Client private key (PEM) for mutual TLS, with --tls-cert.")


def _client_kwargs(api_key: str | None, tls: bool, tls_ca: Path | None, tls_cert: Path | None,
                   tls_key: Path | None) -> dict:
    """ChatbotClient's credential arguments from the shared options; bad combinations fail here."""
    if api_key is not None and not api_key.strip():
        _fail(f"--api-key (or {API_KEY_ENV}) is empty; give the key or leave it unset")
    if (tls_cert is None) != (tls_key is None):
        _fail("mutual TLS needs both --tls-cert and --tls-key (or neither)")
    return dict(api_key=api_key, tls=tls, ca_file=tls_ca, cert_file=tls_cert, key_file=tls_key)


def _bind_probe(host: str, port: int) -> OSError | None:
    """Try to bind ``host:port`` (SO_REUSEADDR, as gRPC binds) and let go: the error, if any.

    Checked before the server starts so a taken port fails at once with one line: a failed bind
    inside gRPC also logs its own C-core error line, and one after the gRPC port is up leaves a
    half-started server behind. The server still reports a bind that fails later (a race).
    """
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            s.listen()
    except OSError as e:
        return e
    return None


def _port_failure(host: str, port: int, option: str, reason: str) -> str:
    """One line naming the address that could not be bound and the option that changes it."""
    if option == "--host":
        return f"cannot listen on {host}:{port}: {reason}; choose an address of this machine with --host"
    hint = " (0 picks a free one)" if option == "--port" else ""
    return f"cannot listen on {host}:{port}: {reason}; choose another port with {option}{hint}"


def _bind_failure(e: OSError, host: str, port: int, metrics_port: int | None) -> str:
    """The one-line message for an OSError out of run_server (a bind that lost a race with the probe)."""
    import errno

    if f"cannot bind {host}:{port}" in str(e):
        return _port_failure(host, port, "--port", "the port is already in use or the address is not local")
    if metrics_port is not None and e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
        return _port_failure(host, metrics_port, "--metrics-port", e.strerror or str(e))
    return str(e)


@app.callback()
def _main(verbose: bool = _flag(False, "--verbose/--no-verbose", "-v", help="Debug logging.")) -> None:
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
    lower_if_too_large: bool = _flag(False, "--lower-if-too-large/--no-lower-if-too-large",
                                     help="Use the largest workable vocab size if too large."),
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
    config: Path = typer.Argument(None, help="Experiment YAML file (omit with --resume)."),
    set_: list[str] = typer.Option([], "--set", help="Override: key.path=value (repeatable), e.g. train.epochs=3."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Write the run here instead of output.dir/<name>-<time>."),
    progress: bool = _flag(True, "--progress/--no-progress", help="Show a progress bar."),
    resume: Path = typer.Option(None, "--resume", help="Continue this run folder from its last checkpoint."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Train with DDP on N local processes (via torchrun)."),
):
    """Train the model an experiment config describes; writes a run folder with its bundle."""
    from chatforge.config import ConfigError, load_config
    from chatforge.data import DataError
    from chatforge.tokenizer import TokenizerError
    from chatforge.training.checkpoint import CheckpointError
    from chatforge.training.distributed import launched_distributed, torchrun_command
    from chatforge.training.run import run_experiment
    from chatforge.training.tasks import TaskDataError

    if nproc > 1:
        import subprocess

        argv, args = sys.argv[1:], []
        for i, a in enumerate(argv):  # re-run this very command line under torchrun, minus --nproc N
            if a == "--nproc" or a.startswith("--nproc=") or (i > 0 and argv[i - 1] == "--nproc"):
                continue
            args.append(a)
        raise typer.Exit(subprocess.call(torchrun_command(nproc, args)))
    if (config is None) == (resume is None):
        _fail("give either CONFIG (a new run) or --resume RUN_DIR (continue a run), not both or neither")
    if resume is not None and set_:
        _fail("--set cannot change a resumed run; it continues with the config saved in the run folder")
    try:
        # Only rank 0 draws a progress bar under torchrun.
        show = progress and (not launched_distributed() or os.environ.get("RANK", "0") == "0")
        callbacks = [_RichProgress(err_console)] if show else []
        if resume is not None:
            from chatforge.training.run import resume_experiment

            result = resume_experiment(resume, callbacks=callbacks)
        else:
            cfg = load_config(config, set_)
            result = run_experiment(cfg, callbacks=callbacks, run_dir=run_dir)
    except (ConfigError, DataError, TokenizerError, TaskDataError, CheckpointError, ValueError) as e:
        _fail(str(e))
    if launched_distributed() and os.environ.get("RANK", "0") != "0":
        return
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
def sweep(
    config: Path = typer.Argument(..., help="Base experiment YAML file."),
    space: Path = typer.Option(..., "--space", help="YAML: dotted config key -> distribution."),
    trials: int = typer.Option(10, "--trials", min=1, help="Trials to run in this process."),
    storage: str = typer.Option(None, "--storage", help="Optuna RDB URL (default sqlite:///runs/optuna.db)."),
    study: str = typer.Option(None, "--study", help="Study name (default <config name>-sweep); joined if it exists."),
    out: Path = typer.Option(None, "--out", help="Sweep folder (default output.dir/sweeps/<study>)."),
    set_: list[str] = typer.Option([], "--set", help="Override the base config: key.path=value (repeatable)."),
):
    """Optuna sweep: each trial trains a run (tracked in MLflow); writes the best config as YAML."""
    from chatforge.config import ConfigError, load_config
    from chatforge.training.sweep import load_space, run_sweep

    try:
        base = load_config(config, set_)
        result = run_sweep(base, load_space(space), trials=trials, storage=storage, study_name=study,
                           sweep_dir=out)
    except (ConfigError, RuntimeError) as e:
        _fail(str(e))
    table = Table(title=f"study {result.study_name} ({result.n_trials} trials)")
    table.add_column("parameter")
    table.add_column("best value", justify="right")
    for k, v in result.best_params.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    table.add_row("valid_loss", f"{result.best_value:.4f}")
    console.print(table)
    console.print(f"best config: [bold]{result.best_config_path}[/]", highlight=False)


@app.command()
def generate(
    bundle: Path = typer.Argument(..., help="Bundle folder (runs/<run>/bundle)."),
    text: list[str] = typer.Argument(..., help="Message(s) to answer."),
    max_new_tokens: int = typer.Option(64),
    sample: bool = _flag(False, "--sample/--no-sample", help="Sample instead of greedy decoding."),
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


# ------------------------------------------------------------------ evaluate, compare
@app.command()
def evaluate(
    bundle: Path = typer.Argument(..., help="Bundle folder (runs/<run>/bundle)."),
    data: Path = typer.Option(None, "--data", help="Data file (default: the bundle's training data file)."),
    fmt: str = typer.Option("auto", "--format", help="auto, chatbot_csv, clinc150, csv, tsv, jsonl."),
    split: str = typer.Option("valid", "--split", help="valid, test or all (split as the bundle's config does)."),
    clinc_keys: str = typer.Option(None, "--clinc-keys", help="CLINC150 lists to read, e.g. val,oos_val."),
    out: Path = typer.Option(None, "--out", help="Report folder (default <run>/eval/<data>-<split>)."),
    max_examples: int = typer.Option(None, "--max-examples", min=1, help="Evaluate at most this many."),
    cross_fit: int = typer.Option(0, "--cross-fit", min=0, max=100,
                                  help="Also cross-fit the oos policy over this many folds of the data (e.g. 10): "
                                       "honest figures when its threshold was chosen on this split. 0: off."),
    cross_fit_repeats: int = typer.Option(10, "--cross-fit-repeats", min=1, max=1000,
                                          help="Random fold assignments to average over (the worst is shown too)."),
):
    """Evaluate a bundle: JSON + Markdown report and PNG plots in one folder."""
    from chatforge.bundle import BundleError
    from chatforge.config import ConfigError
    from chatforge.data import DataError
    from chatforge.evaluation.evaluate import HEADLINE, EvaluationError, evaluate_bundle

    keys = [k.strip() for k in clinc_keys.split(",") if k.strip()] if clinc_keys else None
    try:
        res = evaluate_bundle(bundle, data, fmt=fmt, split=split, clinc_keys=keys, out_dir=out,
                              max_examples=max_examples, cross_fit=cross_fit, cross_fit_repeats=cross_fit_repeats)
    except (BundleError, ConfigError, DataError, EvaluationError, FileNotFoundError) as e:
        _fail(str(e))
    s = res.summary
    table = Table(title=f"{s['name']} on {Path(s['data']).name} ({s['split']}, {s['n']} examples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in HEADLINE:
        v = s["metrics"].get(k)
        if v is not None:
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    cf = s["metrics"].get("cross_fitted")
    if cf:
        for k in ("in_scope_accuracy", "oos_recall"):
            table.add_row(f"{k}, cross-fitted ({cf['folds']}-fold x {cf['repeats']}; worst)",
                          f"{cf[k]:.4f} ({cf['min_' + k]:.4f})")
    elif "cross_fitted" in s["metrics"]:
        table.add_row("cross-fitted", "nothing in the oos policy is fitted on validation")
    if s["metrics"].get("oos_policy_fitted_on_this_split"):
        console.print("[yellow]the bundle's oos policy was fitted on this split: its figures are in-sample"
                      + ("" if cf else "; add --cross-fit 10 for held-out ones") + "[/]")
    table.add_row("latency per example", f"{s['latency_ms_per_example']:.2f} ms")
    table.add_row("bundle size", f"{s['bundle_size_bytes'] / 1e6:.2f} MB")
    console.print(table)
    console.print(f"report: [bold]{res.out_dir}[/]", highlight=False)


@app.command()
def compare(
    runs: list[Path] = typer.Argument(None, help="Run folders (default: every run under --runs-dir)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Folder of run folders."),
    experiment: str = typer.Option(None, "--experiment", help="Only runs of this experiment (or config name)."),
    tag: list[str] = typer.Option([], "--tag", help="key=value filter on config keys or family/task (repeatable)."),
    metric: str = typer.Option("in_scope_accuracy", "--metric", help="Sort by this metric."),
    split: str = typer.Option(None, "--split", help="Evaluation split to compare (default: the most common)."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="Read runs from this MLflow store instead."),
    md: Path = typer.Option(None, "--md", help="Write the leaderboard as Markdown."),
    csv_out: Path = typer.Option(None, "--csv", help="Write the leaderboard as CSV."),
    plot: Path = typer.Option(None, "--plot", help="Write learning curves across runs (PNG)."),
):
    """Leaderboard over runs: metrics side by side with parameters, training time, latency, size."""
    from chatforge.evaluation import compare as C

    try:
        tags = C.parse_tags(tag)
        if tracking_uri:
            records = C.collect_mlflow(tracking_uri, experiment, tags)
        else:
            records = C.collect_runs(runs or [], runs_dir, experiment, tags)
        lb = C.build_leaderboard(records, metric=metric, split=split)
    except C.CompareError as e:
        _fail(str(e))
    table = Table(title=f"leaderboard by {lb.metric}" + (f" ({lb.split})" if lb.split else ""))
    for c in lb.columns:
        table.add_column(c, justify="left" if c in ("run", "family", "task", "source") else "right")
    for row in lb.rows:
        table.add_row(*("-" if row.get(c) is None else f"{row[c]:.4f}" if isinstance(row[c], float)
                        else str(row[c]) for c in lb.columns))
    console.print(table)
    for path, write in ((md, C.write_markdown), (csv_out, C.write_csv)):
        if path is not None:
            write(lb, path)
            console.print(f"wrote [bold]{path}[/]", highlight=False)
    if plot is not None:
        C.write_learning_curves(records, plot)
        console.print(f"wrote [bold]{plot}[/]", highlight=False)


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
    drain_delay: float = typer.Option(5.0, help="Seconds after SIGTERM that readiness is NOT_SERVING while calls "
                                      "are still served, so balancers move traffic first (0 disables)."),
    model_dir: Path = typer.Option(None, "--model-dir", help="Serve DIR/<name>/<version>/ bundles; hot-swaps "
                                   "new versions (latest, or pinned by DIR/<name>/PINNED or --pin)."),
    pin: list[str] = typer.Option([], "--pin", help="NAME=VERSION to serve from --model-dir (rollback)."),
    poll_interval: float = typer.Option(5.0, help="Seconds between --model-dir scans."),
    metrics_port: int = typer.Option(None, help="Serve /metrics, /healthz, /readyz over HTTP on this port."),
    http_port: int = typer.Option(None, help="Also serve the OpenAI-compatible HTTP API and the chat page "
                                  "(http://HOST:PORT/) on this port; same engine, keys and drain as gRPC."),
    max_running: int = typer.Option(8, help="Per model: sequences in the running batch."),
    max_queued: int = typer.Option(64, help="Per model: requests waiting beyond that (then RESOURCE_EXHAUSTED)."),
    max_batch_size: int = typer.Option(32, help="Classify: most texts per micro-batch."),
    max_wait_ms: float = typer.Option(2.0, help="Classify: longest wait for a micro-batch to fill."),
    max_input_tokens: int = typer.Option(None, help="Cap on input tokens (besides each model's own)."),
    max_new_tokens: int = typer.Option(1024, help="Cap on max_new_tokens a request may ask for."),
    max_message_bytes: int = typer.Option(4 * 1024 * 1024, help="Largest gRPC message accepted or sent."),
    pipeline_classifier: str = typer.Option(None, help="Chatbot pipeline: classify with this model first."),
    fallback_reply: str = typer.Option("Sorry, I can't help with that.",
                                       help="Pipeline: the reply to out-of-scope messages."),
    oos_threshold: float = typer.Option(0.0, help="Pipeline: scores below this count as out of scope."),
    api_keys_file: Path = typer.Option(None, help="File of API keys (one per line); else CHATFORGE_API_KEYS."),
    protect_health: bool = _flag(False, "--protect-health/--no-protect-health",
                                 help="Require API keys for health and reflection too."),
    tls_cert: Path = typer.Option(None, help="Server certificate chain (PEM) for TLS."),
    tls_key: Path = typer.Option(None, help="Server private key (PEM) for TLS."),
    tls_client_ca: Path = typer.Option(None, help="CA (PEM) that client certificates must chain to (mTLS)."),
    precision: str = typer.Option("fp32", help="Torch models' precision: fp32, or bf16 (weights cast once at "
                                  "load; several times faster matmuls on CPUs with AMX/AVX512-BF16 and on GPUs)."),
):
    """Serve bundles over gRPC (Chatbot service, health, reflection) until SIGTERM/SIGINT."""
    from chatforge.serving.engine import PipelineConfig
    from chatforge.serving.server import ServerConfig, run_server

    named = None if model_dir is not None and not (bundles or model) else _parse_models(bundles or [], model)
    pins = {}
    for item in pin:
        if "=" not in item:
            _fail(f"--pin {item!r} must look like NAME=VERSION, e.g. chat=3")
        name, version = item.split("=", 1)
        pins[name.strip()] = version.strip()
    for option, p in (("--port", port), ("--metrics-port", metrics_port)):
        if p and 0 < p <= 65535 and (err := _bind_probe(host, p)) is not None:
            import errno

            # An address that is not this machine's is --host's fault, not the port's.
            _fail(_port_failure(host, p, "--host" if err.errno == errno.EADDRNOTAVAIL else option,
                                (err.strerror or str(err)).lower()))
    try:
        pipeline = PipelineConfig(pipeline_classifier, fallback_reply, oos_threshold) if pipeline_classifier else None
        config = ServerConfig(
            bundles=named or {}, model_dir=model_dir, pins=pins, poll_interval=poll_interval, host=host, port=port,
            port_file=port_file, grace=grace, drain_delay=drain_delay, metrics_port=metrics_port, http_port=http_port,
            api_keys_file=api_keys_file, open_health=not protect_health, tls_cert=tls_cert, tls_key=tls_key,
            tls_client_ca=tls_client_ca, max_message_bytes=max_message_bytes, precision=precision,
            max_running=max_running, max_queued=max_queued, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
            max_input_tokens=max_input_tokens, max_new_tokens=max_new_tokens, pipeline=pipeline)
        code = run_server(config)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    except OSError as e:  # a port that is taken: one line naming it and its option, not a traceback
        _fail(_bind_failure(e, host, port, metrics_port))
    raise typer.Exit(code or 0)


# ----------------------------------------------------------------------------- chat
@app.command()
def chat(
    target: str = typer.Argument(..., help="HOST:PORT of a chatforge server."),
    message: list[str] = typer.Option([], "--message", "-m", help="Send these and exit (else interactive)."),
    model: str = typer.Option(None, help="Model name on the server (default: its generator)."),
    session_id: str = typer.Option(None, help="Conversation id sent with each turn."),
    max_new_tokens: int = typer.Option(64),
    sample: bool = _flag(False, "--sample/--no-sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0),
    top_k: int = typer.Option(0),
    top_p: float = typer.Option(1.0),
    timeout: float = typer.Option(30.0, help="Deadline per reply, seconds."),
    api_key: str = _api_key_option(),
    tls: bool = _tls_option(),
    tls_ca: Path = _tls_ca_option(),
    tls_cert: Path = _tls_cert_option(),
    tls_key: Path = _tls_key_option(),
):
    """Chat with a server in the terminal; replies print as they stream."""
    from chatforge.client import ChatbotClient, ChatbotError

    _check_seconds("--timeout", timeout)
    creds = _client_kwargs(api_key, tls, tls_ca, tls_cert, tls_key)

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
        with ChatbotClient(target, timeout=timeout, **creds) as client:
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
    except ValueError as e:  # e.g. a malformed target
        _fail(str(e))


@app.command()
def health(
    target: str = typer.Argument(..., help="HOST:PORT"),
    service: str = typer.Option("", help="Service name; '' is the whole server, chatforge.v1.Chatbot readiness."),
    timeout: float = typer.Option(3.0, help="Seconds to wait for an answer."),
    api_key: str = _api_key_option(),
    tls: bool = _tls_option(),
    tls_ca: Path = _tls_ca_option(),
    tls_cert: Path = _tls_cert_option(),
    tls_key: Path = _tls_key_option(),
):
    """Check gRPC health like grpc_health_probe: exit 0 only when SERVING.

    Imports no torch (nor anything else of the model side): a container HEALTHCHECK runs it
    every few seconds with a short timeout.
    """
    from chatforge.client import ChatbotClient, ChatbotError

    _check_seconds("--timeout", timeout)
    creds = _client_kwargs(api_key, tls, tls_ca, tls_cert, tls_key)
    try:
        with ChatbotClient(target, timeout=timeout, **creds) as client:
            status = client.health(service)
    except ChatbotError as e:
        err_console.print(f"{target}: {e}", highlight=False, markup=False, soft_wrap=True)  # one line
        raise typer.Exit(1) from None
    except ValueError as e:  # e.g. a malformed target
        _fail(str(e))
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


# ------------------------------------------------------------------------ loadtest
def _fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _render_loadtest(report, slo_results) -> None:
    from chatforge.client.loadtest import histogram

    d = report.to_dict()
    t = Table(title=f"{report.rpc} @ {report.target} (concurrency {report.concurrency}, "
                    f"{report.connections} connection(s){', ' + str(report.rps_limit) + ' rps' if report.rps_limit else ''})")
    t.add_column("summary")
    t.add_column("value", justify="right")
    for k, v in (("requests", str(report.count)), ("ok / errors", f"{report.ok} / {report.errors}"),
                 ("error rate", f"{report.error_rate:.2%}"), ("total time", f"{report.wall_seconds:.2f} s"),
                 ("throughput", f"{report.throughput:.2f} req/s")):
        t.add_row(k, v)
    lat = d["latency_s"]
    for k in ("mean", "min", "p50", "p90", "p95", "p99", "max"):
        t.add_row(f"latency {k}", _fmt_ms(lat[k]))
    if d["ttft_s"] is not None:
        for k in ("p50", "p90", "p99"):
            t.add_row(f"time to first token {k}", _fmt_ms(d["ttft_s"][k]))
        tok = d["tokens"]
        t.add_row("tokens generated", str(tok["total"]))
        t.add_row("tokens/s (all streams)", f"{tok['per_second']:.1f}")
        if tok["stream_decode_rate_mean"] is not None:
            t.add_row("tokens/s per stream (mean)", f"{tok['stream_decode_rate_mean']:.1f}")
    for k, v in d["status_codes"].items():
        t.add_row(f"status {k}", str(v))
    srv = d["server"]
    if srv:
        if srv.get("cpu_percent_mean") is not None:
            t.add_row("server CPU mean / max", f"{srv['cpu_percent_mean']:.0f}% / {srv['cpu_percent_max']:.0f}%")
        if srv.get("rss_bytes_max") is not None:
            t.add_row("server RSS max", f"{srv['rss_bytes_max'] / 2**20:.0f} MiB")
        t.add_row("server-counted requests", f"{srv['requests_delta']:.0f}")
    console.print(t)
    hist = histogram(report.latencies())
    if hist:
        width = 40
        top = max(b["count"] for b in hist) or 1
        console.print("[bold]latency histogram[/] (OK requests)")
        for b in hist:
            bar = "■" * round(width * b["count"] / top)
            console.print(f"  {b['upper'] * 1000:10.1f} ms [{b['count']:>6}] |{bar}", highlight=False)
    for msg, n in d["error_messages"].items():
        err_console.print(f"[red]{n} x[/] {msg}", highlight=False, markup=False)
    for r in slo_results:
        mark = "[green]PASS[/]" if r.passed else "[bold red]MISS[/]"
        actual = "n/a" if r.actual is None else (
            f"{r.actual:.2f} req/s" if r.key == "rps" else f"{r.actual:.3%}" if r.key == "errors"
            else _fmt_ms(r.actual))
        console.print(f"SLO {r.slo}: {mark} (actual {actual})")


@app.command()
def loadtest(
    target: str = typer.Argument(..., help="HOST:PORT of a chatforge server (or a load balancer)."),
    rpc: str = typer.Option("reply", "--rpc", help="reply, classify or health."),
    protocol: str = typer.Option("grpc", "--protocol", help="grpc, or http: the OpenAI-compatible HTTP surface "
                                 "(TARGET is then the --http-port address; replies are streamed over SSE)."),
    concurrency: int = typer.Option(1, "--concurrency", "-c", help="Concurrent callers."),
    duration: float = typer.Option(None, "--duration", "-z", help="Run this many seconds..."),
    requests: int = typer.Option(None, "--requests", "-n", help="...or send this many requests."),
    rps: float = typer.Option(None, "--rps", help="Open loop: start requests at this fixed rate."),
    connections: int = typer.Option(1, "--connections", help="gRPC channels shared by the callers."),
    data: Path = typer.Option(None, "--data", help="Corpus file with the messages to send (default: sample corpus)."),
    model: str = typer.Option(None, "--model", help="Model name on the server (default: its default)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Reply length cap per request."),
    timeout: float = typer.Option(30.0, "--timeout", help="Deadline per request, seconds."),
    slo: str = typer.Option(None, "--slo", help="Exit 1 unless met, e.g. p99=200ms,errors=0.1%,rps=20."),
    sweep_levels: str = typer.Option(None, "--sweep", help="Run once per concurrency level, e.g. 1,2,4,8."),
    metrics: str = typer.Option(None, "--metrics", help="Server metrics HOST:PORT: add CPU/RSS to the report."),
    retries: bool = _flag(False, "--retries/--no-retries", help="Let the client retry UNAVAILABLE."),
    out: Path = typer.Option(None, "--out", help="Write report.json, requests.csv and report.png here."),
    api_key: str = _api_key_option(),
    tls: bool = _tls_option(),
    tls_ca: Path = _tls_ca_option(),
    tls_cert: Path = _tls_cert_option(),
    tls_key: Path = _tls_key_option(),
):
    """Load-test a server like ghz: throughput, latency percentiles, TTFT, status codes; SLO gate."""
    import threading

    from chatforge.client import ChatbotError
    from chatforge.client.http import HttpChatError
    from chatforge.client.loadtest import (
        LoadTestConfig,
        LoadTestError,
        check_slos,
        load_texts,
        parse_levels,
        parse_slo,
        run_load_test,
        run_sweep,
        write_report,
        write_sweep,
    )

    creds = _client_kwargs(api_key, tls, tls_ca, tls_cert, tls_key)
    stop = threading.Event()
    try:
        slos = parse_slo(slo) if slo else []
        levels = parse_levels(sweep_levels) if sweep_levels else None
        texts = load_texts(data) if rpc != "health" else []
        cfg = LoadTestConfig(target=target, rpc=rpc, concurrency=concurrency, requests=requests, duration=duration,
                             rps=rps, connections=connections, texts=texts, model=model, timeout=timeout,
                             max_new_tokens=max_new_tokens, retries=retries,
                             metrics_url=metrics, protocol=protocol, **creds).validate()
        if levels:
            def progress(n, r):
                err_console.print(f"concurrency {n}: {r.throughput:.1f} req/s, p99 {_fmt_ms(r.latency()['p99'])}",
                                  highlight=False)

            result = run_sweep(cfg, levels, stop=stop, on_level=progress)
            reports = result.reports
        else:
            reports = [run_load_test(cfg, stop=stop)]
    except LoadTestError as e:
        _fail(str(e))
    except (ChatbotError, HttpChatError) as e:
        _fail(f"{target}: {e}", code=1)
    except KeyboardInterrupt:
        stop.set()
        _fail("interrupted", code=130)
    missed = False
    for report in reports:
        slo_results = check_slos(report, slos)
        missed = missed or not all(r.passed for r in slo_results)
        _render_loadtest(report, slo_results)
        if out is not None and not levels:
            paths = write_report(report, out, slos=slo_results)
            console.print("wrote " + ", ".join(str(p) for p in paths.values()), highlight=False)
    if levels:
        table = Table(title="concurrency sweep")
        rows = result.rows()
        for col in ("concurrency", "throughput_rps", "latency_p50_ms", "latency_p99_ms", "ttft_p99_ms", "errors"):
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(*("-" if row[c] is None else f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c])
                            for c in ("concurrency", "throughput_rps", "latency_p50_ms", "latency_p99_ms",
                                      "ttft_p99_ms", "errors")))
        console.print(table)
        if out is not None:
            paths = write_sweep(result, out)
            console.print("wrote " + ", ".join(str(p) for p in paths.values()), highlight=False)
    if missed:
        err_console.print("[bold red]SLO missed[/]")
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- top
@app.command()
def top(
    target: str = typer.Argument(..., help="HOST:METRICS_PORT of a server (or a /metrics URL)."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between scrapes."),
    count: int = typer.Option(None, "--count", help="Stop after this many samples (default: until Ctrl-C)."),
    api_key: str = typer.Option(None, "--api-key", envvar=API_KEY_ENV, show_envvar=True, show_default=False,
                                help="Sent as 'Authorization: Bearer <key>' with each scrape (a metrics endpoint "
                                     f"behind an authenticating proxy); prefer the {API_KEY_ENV} variable."),
    tls_ca: Path = _pem_option("--tls-ca", "CA certificate (PEM) to trust for an https:// metrics URL."),
):
    """Watch a server's CPU, memory, fds, threads, GPU memory and queue over time."""
    from rich.live import Live

    from chatforge.client.top import MonitorError, ResourceMonitor

    def num(v, fmt="{:.0f}", scale=1.0):
        return "-" if v is None else fmt.format(v / scale)

    try:
        monitor = ResourceMonitor(target, interval=interval, api_key=api_key, ca_file=tls_ca)
    except ValueError as e:
        _fail(str(e))
    rows: list = []

    def render() -> Table:
        t = Table(title=f"chatforge top {monitor.url}")
        for c in ("time", "CPU %", "RSS MiB", "fds", "threads", "GPU MiB", "running", "waiting", "req/s", "tok/s"):
            t.add_column(c, justify="right", no_wrap=c == "time")
        for s in rows[-20:]:
            t.add_row(s[0], num(s[1].cpu_percent, "{:.1f}"), num(s[1].rss_bytes, scale=2**20), num(s[1].open_fds),
                      num(s[1].threads), num(s[1].gpu_allocated_bytes, scale=2**20), num(s[1].requests_running),
                      num(s[1].requests_waiting), num(s[1].requests_per_s, "{:.1f}"), num(s[1].tokens_per_s, "{:.1f}"))
        return t

    import time as _time

    try:
        with Live(render(), console=console, auto_refresh=False) as live:
            for sample in monitor.watch(count):
                rows.append((_time.strftime("%H:%M:%S"), sample))
                live.update(render(), refresh=True)
    except MonitorError as e:
        _fail(str(e), code=1)
    except KeyboardInterrupt:
        pass


# -------------------------------------------------------------------- conversations
conversations_app = typer.Typer(no_args_is_help=True, help="The conversation store.")
app.add_typer(conversations_app, name="conversations")


def _parse_since(value: str):
    """ISO date/time (naive = UTC) or a relative age such as 30m, 24h, 7d."""
    import re
    from datetime import datetime, timedelta, timezone

    m = re.fullmatch(r"\s*(\d+)\s*([mhd])\s*", value)
    if m:
        unit = {"m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return datetime.now(timezone.utc) - timedelta(**{unit: int(m.group(1))})
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"--since {value!r} is not understood; allowed: an ISO date/time (2026-01-31, "
              "2026-01-31T12:00:00+09:00) or an age such as 30m, 24h, 7d")
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


@conversations_app.command("export")
def conversations_export(
    url: str = typer.Option(..., "--url", help="Store URL, e.g. sqlite:///runs/conversations.db or postgresql+psycopg://..."),
    out: Path = typer.Option(..., "--out", help="File to write (atomically)."),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl or csv."),
    since: str = typer.Option(None, "--since", help="Only turns at/after this ISO time, or an age (24h, 7d)."),
):
    """Export stored turns to JSONL/CSV for the next training round."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from chatforge.serving.store import EXPORT_FORMATS, ConversationStore

    if fmt not in EXPORT_FORMATS:
        _fail(f"--format {fmt!r} is unknown; allowed: {', '.join(EXPORT_FORMATS)}")
    try:
        parsed = make_url(url)
    except ArgumentError:
        _fail(f"--url {url!r} is not a database URL; e.g. sqlite:///runs/conversations.db")
    # Opening a store creates its database: exporting from a mistyped path must not make an empty one.
    db = parsed.database
    if parsed.get_backend_name() == "sqlite" and db and db != ":memory:" and not Path(db).is_file():
        _fail(f"no conversation database at {db}")
    since_dt = _parse_since(since) if since else None
    try:
        store = ConversationStore(url)
        try:
            n = store.export(out, format=fmt, since=since_dt)
        finally:
            store.close()
    except (SQLAlchemyError, ModuleNotFoundError) as e:
        _fail(f"cannot read the conversation store at {parsed.render_as_string(hide_password=True)}: {e}", code=1)
    console.print(f"exported {n} turns to [bold]{out}[/]", highlight=False)


# --------------------------------------------------------------------------- convert
convert_app = typer.Typer(no_args_is_help=True, help="Convert Hugging Face checkpoints to and from bundles.")
app.add_typer(convert_app, name="convert")


@convert_app.command("from-hf")
def convert_from_hf(
    src: Path = typer.Argument(..., help="HF checkpoint folder (config.json, weights, tokenizer files)."),
    out: Path = typer.Argument(..., help="Bundle folder to write."),
    task: str = typer.Option(None, help="Task of the bundle (gpt: lm or generation); default: the family's."),
    bos_token: str = typer.Option(None, "--bos-token", help="Vocabulary token that begins a sequence, when "
                                  "it is not <s>, <|endoftext|> or [CLS] (e.g. openai-gpt has none)."),
    eos_token: str = typer.Option(None, "--eos-token", help="Vocabulary token that ends a sequence, when it "
                                  "is not </s>, <|endoftext|> or [SEP]."),
):
    """Convert a BERT / GPT / GPT-2 checkpoint folder into a chatforge bundle (keeps its tokenizer)."""
    from chatforge.interop import ConversionError, from_hf

    kwargs = {k: v for k, v in (("task", task), ("bos_token", bos_token), ("eos_token", eos_token)) if v}
    try:
        path = from_hf(src, out, **kwargs)
    except (ConversionError, ValueError, OSError) as e:
        _fail(str(e))
    console.print(f"bundle written to [bold]{path}[/]", highlight=False)


@convert_app.command("to-hf")
def convert_to_hf(
    bundle: Path = typer.Argument(..., help="chatforge bundle folder."),
    out: Path = typer.Argument(..., help="HF checkpoint folder to write (save_pretrained layout)."),
):
    """Export a bundle as a Hugging Face checkpoint folder."""
    from chatforge.interop import ConversionError, to_hf

    try:
        path = to_hf(bundle, out)
    except (ConversionError, ValueError, OSError) as e:
        _fail(str(e))
    console.print(f"HF checkpoint written to [bold]{path}[/]", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
