"""Research commands: configs, tokenizers, data sets, train, sweep, generate, evaluate, compare, convert, bundle."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from chatforge.cli._shared import _fail, _flag, _parse_models, app, console, err_console

tokenizer_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Train and inspect SentencePiece tokenizers.")
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Get the public data sets.")
config_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Check experiment configs.")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")


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
    console.print(cfg.resolved_yaml(), highlight=False, markup=False)


# ------------------------------------------------------------------------ tokenizer
@tokenizer_app.command("train")
def tokenizer_train(
    data: Path = typer.Option(..., "--data", help="Corpus file (ChatbotData CSV, CLINC150 JSON, CSV/TSV/JSONL)."),
    out: Path = typer.Option(Path("tokenizer.model"), "--out", help="Where to write the .model file."),
    vocab_size: int = typer.Option(8000, min=16, help="Vocabulary size (at least 16: 7 ids are reserved)."),
    model_type: str = typer.Option("unigram", help="unigram or bpe."),
    fmt: str = typer.Option("auto", "--format", help="auto, chatbot_csv, clinc150, csv, tsv, jsonl."),
    lower_if_too_large: bool = _flag(False, "--lower-if-too-large/--no-lower-if-too-large",
                                     help="Use the largest workable vocab size if too large."),
):
    """Train a SentencePiece tokenizer with chatforge's special tokens."""
    from chatforge.data import DataError, read_examples
    from chatforge.tokenizer import MIN_VOCAB_SIZE, Tokenizer, TokenizerError, VocabTooLargeError

    if out.is_dir():
        _fail(f"--out {out} is a folder; give the path of the .model file to write, e.g. {out / 'tokenizer.model'}")
    try:
        examples, report = read_examples(data, format=fmt)
        texts = [e.text for e in examples] + [e.response for e in examples if e.response]
        tok = Tokenizer.train(texts, vocab_size=vocab_size, model_type=model_type,
                              on_vocab_too_large="lower" if lower_if_too_large else "error")
    except VocabTooLargeError as e:  # its own message names the config keys; here the flags are what the user has
        if e.max_size is not None and e.max_size < MIN_VOCAB_SIZE:
            _fail(f"this corpus supports only {e.max_size} pieces, fewer than the smallest --vocab-size "
                  f"({MIN_VOCAB_SIZE}): train on more text, or pass --lower-if-too-large to use {e.max_size}")
        hint = f"; the largest workable size for this corpus is {e.max_size}" if e.max_size else ""
        _fail(f"--vocab-size {e.requested} is too large for this corpus{hint}: lower --vocab-size, or pass "
              "--lower-if-too-large to use the largest workable size")
    except (DataError, TokenizerError, FileNotFoundError) as e:
        _fail(str(e))
    try:
        tok.save(out)
    except OSError as e:  # under a file, no permission, a full disk
        _fail(f"cannot write {out}: {e.strerror or e}")
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
    from chatforge.tasks import TaskDataError
    from chatforge.tokenizer import TokenizerError
    from chatforge.training.checkpoint import CheckpointError
    from chatforge.training.distributed import launched_distributed, torchrun_command
    from chatforge.training.run import run_experiment
    from chatforge.training.tracking import TrackingError

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
    except (ConfigError, DataError, TokenizerError, TaskDataError, CheckpointError, TrackingError, ValueError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        from chatforge.training.checkpoint import checkpoint_path

        where = resume if resume is not None else run_dir
        if where is None:
            _fail("interrupted; if train.checkpoint_every_steps wrote a checkpoint, continue with chatforge train "
                  "--resume RUN_DIR (the run folder named in the log)", code=130)
        if checkpoint_path(where).is_file():
            _fail(f"interrupted; the last checkpoint is in {where}: continue with chatforge train --resume {where}",
                  code=130)
        _fail(f"interrupted; no checkpoint was written in {where}, so the run cannot be resumed: start it again "
              f"(train.checkpoint_every_steps=N makes a run resumable)", code=130)
    if launched_distributed() and os.environ.get("RANK", "0") != "0":
        return
    m = result.metrics
    table = Table(title=f"run {result.run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    # every kind of model's headline figures per split: classifiers', generators' and selection models' alike
    headline = ("loss", "accuracy", "in_scope_accuracy", "oos_recall", "r1_of_10", "mrr_of_10", "chrf", "bleu")
    for k in ("num_parameters", "train_examples", "steps", "train_seconds", "best_epoch",
              *(f"{split}_{h}" for split in ("valid", "test", "dev") for h in headline)):
        if k in m:
            v = m[k]
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    for s in m.get("samples", [])[:5]:
        console.print(f"[dim]Q:[/] {escape(s['question'])}\n[dim]ref:[/] {escape(s['reference'])}\n"
                      f"[bold]bot:[/] {escape(s['reply'])}\n",
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
    from chatforge.training.sweep import SweepInterrupted, load_space, run_sweep

    try:
        base = load_config(config, set_)
        result = run_sweep(base, load_space(space), trials=trials, storage=storage, study_name=study,
                           sweep_dir=out)
    except SweepInterrupted as e:
        _fail(str(e), code=130)
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
    repetition_penalty: float = typer.Option(1.0, help="Penalty on tokens already generated, in [1, 10]; 1: none."),
    no_repeat_ngram: int = typer.Option(0, help="Never repeat an n-gram of this size in a reply; 0: off."),
):
    """Answer messages with a bundle locally, without a server (classifiers print the label)."""
    from chatforge.bundle import BundleError
    from chatforge.decoding import GenerationOptions
    from chatforge.inference import load_model

    try:  # the options first: a typo is refused before the bundle loads
        opts = GenerationOptions(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed, repetition_penalty=repetition_penalty,
                                 no_repeat_ngram_size=no_repeat_ngram).validate()
        model = load_model(bundle, name="local")
    except (BundleError, ValueError) as e:
        _fail(str(e))
    for t in text:
        if hasattr(model, "stream"):
            reply = "".join(d.text for d in model.stream(t, opts))
            console.print(f"[dim]you:[/] {escape(t)}\n[bold]bot:[/] {escape(reply)}", highlight=False)
        elif hasattr(model, "select"):  # a retrieval (selection) bundle: the pool's best answer and its score
            reply, score = model.select(t)
            console.print(f"[dim]you:[/] {escape(t)}\n[bold]bot:[/] {escape(reply)} ({score:.3f})", highlight=False)
        else:
            p = model.classify([t])[0]
            console.print(f"[dim]text:[/] {escape(t)}\n[bold]label:[/] {escape(p.label)} ({p.score:.3f})", highlight=False)


# ------------------------------------------------------------------ evaluate, compare
@app.command()
def evaluate(
    bundle: Path = typer.Argument(..., help="Bundle folder (runs/<run>/bundle)."),
    data: Path = typer.Option(None, "--data", help="Data file (default: the bundle's training data file)."),
    fmt: str = typer.Option("auto", "--format", help="auto, chatbot_csv, clinc150, csv, tsv, jsonl."),
    split: str = typer.Option(None, "--split", help="valid, test, dev or all (split as the bundle's config does; dev: the part "
                                                  "data.dev_fraction holds out of a predefined split's train lists). "
                                                  "Default: valid; all for a --data file the bundle did not train "
                                                  "on (unless its split is predefined)."),
    clinc_keys: str = typer.Option(None, "--clinc-keys", help="CLINC150 lists to read, e.g. val,oos_val."),
    text_field: str = typer.Option(None, "--text-field", help="Column (key) of the text in --data (default: the "
                                                              "bundle's data.text_field, else inferred)."),
    label_field: str = typer.Option(None, "--label-field", help="Column (key) of the label in --data."),
    response_field: str = typer.Option(None, "--response-field", help="Column (key) of the reply in --data."),
    out: Path = typer.Option(None, "--out", help="Report folder (default <run>/eval/<data>-<split>)."),
    max_examples: int = typer.Option(None, "--max-examples", min=1,
                                     help="Evaluate the first N only (split named SPLIT-firstN, in its own folder)."),
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
                              max_examples=max_examples, cross_fit=cross_fit, cross_fit_repeats=cross_fit_repeats,
                              fields={"text_field": text_field, "label_field": label_field,
                                      "response_field": response_field})
    except (BundleError, ConfigError, DataError, EvaluationError, FileNotFoundError) as e:
        _fail(str(e))
    except OSError as e:  # the report folder: under a file, no permission, a full disk
        _fail(f"cannot write the report{f' to {out}' if out is not None else ''}: {e.strerror or e} ({e.filename})")
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
def replies(
    model: list[str] = typer.Option([], "--model", help="NAME=BUNDLE (repeatable): generation, lm or selection "
                                    "bundles trained on the same data split. NAME is a column of the table: not "
                                    "question, reference or (with --hybrid) hybrid."),
    hybrid: str = typer.Option(None, "--hybrid", help="SELECTION,GENERATION: add the hybrid column (retrieval "
                               "above a threshold chosen on valid, else generation)."),
    split: str = typer.Option("test", "--split", help="valid, test or all."),
    n: int = typer.Option(30, "--n", min=1, help="Questions in the reply table (figures use the whole split)."),
    out: Path = typer.Option(Path("runs/replies"), "--out", help="Folder for replies.md/.html/.json."),
    max_examples: int = typer.Option(None, "--max-examples", min=1, help="Use at most this many questions."),
    decoding: list[str] = typer.Option([], "--decoding", help="KEY=VALUE decoding option for the generation "
                                       "models (repeatable), e.g. no_repeat_ngram_size=3, repetition_penalty=1.3."),
    familiarity_quantile: float = typer.Option(0.01, "--familiarity-quantile", help="With --hybrid: the share of "
                                               "validation questions the familiarity guard (min_familiarity) may "
                                               "send to the fallback reply; 0: no guard."),
):
    """Reply table: every model answers the same held-out questions side by side, with chrF, BLEU, distinct-n,
    repetition and identical-reply figures."""
    import yaml

    from chatforge.bundle import BundleError
    from chatforge.config import ConfigError, read_yaml
    from chatforge.evaluation.evaluate import EvaluationError
    from chatforge.evaluation.replies import reply_table

    named = _parse_models([], model)
    pair = None
    if hybrid:
        parts = [p.strip() for p in hybrid.split(",")]
        if len(parts) != 2:
            _fail(f"--hybrid {hybrid!r} must look like SELECTION,GENERATION, e.g. retrieval,transformer")
        pair = (parts[0], parts[1])
    options = {}
    for item in decoding:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--decoding {item!r} must look like KEY=VALUE, e.g. no_repeat_ngram_size=3")
        try:
            options[key.strip()] = read_yaml(value)  # 3 -> int, 1.3 -> float, 1e-3 -> float, true -> bool
        except yaml.YAMLError:
            _fail(f"--decoding {item!r}: the value is not a YAML number, boolean or text")
    try:
        res = reply_table(named, hybrid_of=pair, split=split, n=n, out_dir=out, max_examples=max_examples,
                          decoding=options, familiarity_quantile=familiarity_quantile)
    except (BundleError, ConfigError, EvaluationError, FileNotFoundError) as e:
        _fail(str(e))
    table = Table(title=f"replies on {Path(res['data']).name} ({res['split']}, {res['n_questions']} questions)")
    cols = ("chrf", "bleu", "distinct_1", "distinct_2", "avg_length", "repeat_3_rate", "identical_rate")
    table.add_column("model")
    for c in cols:
        table.add_column(c, justify="right")
    for name, fig in res["figures"].items():
        table.add_row(name, *(f"{fig[c]:.4f}" for c in cols))
    console.print(table)
    if "hybrid" in res:
        h = res["hybrid"]
        console.print(f"hybrid threshold (chosen on valid): {h['threshold']:.4f}")
        if h["min_familiarity"] is not None:
            console.print(f"familiarity guard (the {h['familiarity_quantile']:.1%} quantile of valid): "
                          f"{h['min_familiarity']:.3f}; fallback on {res['figures']['hybrid']['fallback_share']:.1%} "
                          f"of {res['split']}")
    console.print(f"reply table: [bold]{out}/replies.md[/] and replies.html", highlight=False)




@app.command()
def compare(
    runs: list[Path] = typer.Argument(None, help="Run folders (default: every run under --runs-dir)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Folder of run folders."),
    experiment: str = typer.Option(None, "--experiment", help="Only runs of this experiment (or config name)."),
    tag: list[str] = typer.Option([], "--tag", help="key=value filter on config keys or family/task (repeatable)."),
    metric: str = typer.Option("in_scope_accuracy", "--metric", help="Sort by this metric."),
    split: str = typer.Option(None, "--split", help="Evaluation split to compare (default: the most common); "
                                                  "on a file other than a run's training data: 'SPLIT of FILE'."),
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
            from chatforge.training.tracking import short_http_retries

            short_http_retries(tracking_uri)  # reading runs is worth a short wait only
            records = C.collect_mlflow(tracking_uri, experiment, tags)
        else:
            records = C.collect_runs(runs or [], runs_dir, experiment, tags)
        lb = C.build_leaderboard(records, metric=metric, split=split)
    except C.CompareError as e:
        _fail(str(e))
    def leaderboard_table(columns: list[str]) -> Table:
        table = Table(title=f"leaderboard by {lb.metric}" + (f" ({lb.split})" if lb.split else ""))
        for c in columns:
            table.add_column(c, justify="left" if c in ("run", "family", "task", "status", "source") else "right")
        for row in lb.rows:
            table.add_row(*("-" if row.get(c) is None else f"{row[c]:.4f}" if isinstance(row[c], float)
                            else str(row[c]) for c in columns))
        return table

    # Columns that do not fit the terminal are left out from the right (parameters first), never squeezed:
    # rich would cut every cell, run names and the ranked metric included, to an ellipsis.
    columns = list(lb.columns)
    table = leaderboard_table(columns)
    unbounded = console.options.update_width(1_000_000)
    while console.measure(table, options=unbounded).maximum > console.width and len(columns) > 3:
        drop = next(c for c in reversed(columns) if c not in ("run", "status", lb.metric))
        columns.remove(drop)
        table = leaderboard_table(columns)
    console.print(table)
    unfinished = C.unfinished_runs(lb)
    if unfinished is not None:
        console.print(f"did not finish: {unfinished}", highlight=False)
    left_out = [c for c in lb.columns if c not in columns]
    if left_out:
        console.print(f"left out to fit {console.width} columns: {', '.join(left_out)} (--md or --csv writes them "
                      f"all)", highlight=False)
    for path, write in ((md, lambda p: C.write_markdown(lb, p)), (csv_out, lambda p: C.write_csv(lb, p)),
                        (plot, lambda p: C.write_learning_curves(records, p))):
        if path is not None:
            try:
                write(path)
            except OSError as e:  # under a file, no permission, a full disk
                _fail(f"cannot write {path}: {e.strerror or e}")
            console.print(f"wrote [bold]{path}[/]", highlight=False)


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


# --------------------------------------------------------------------------- convert
convert_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Convert Hugging Face checkpoints to and from bundles.")
app.add_typer(convert_app, name="convert")


@convert_app.command("from-hf")
def convert_from_hf(
    src: Path = typer.Argument(..., help="HF checkpoint folder (config.json, weights, tokenizer files)."),
    out: Path = typer.Argument(..., help="Bundle folder to write."),
    task: str = typer.Option(None, help="Task of the bundle (gpt: lm or generation); default: the family's. "
                             "A BERT checkpoint's task follows its architecture."),
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
    """Export a bundle as a Hugging Face checkpoint folder: BERT (BertForSequenceClassification and the rest), GPT
    (OpenAIGPTLMHeadModel / GPT2LMHeadModel), and a post-LN Transformer encoder-decoder as MarianMTModel."""
    from chatforge.interop import ConversionError, to_hf

    try:
        path = to_hf(bundle, out)
    except (ConversionError, ValueError, OSError) as e:
        _fail(str(e))
    console.print(f"HF checkpoint written to [bold]{path}[/]", highlight=False)


# --------------------------------------------------------------------------- bundle
bundle_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Work on trained bundles in place.")
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("add-drafts")
def bundle_add_drafts(
    bundle: Path = typer.Argument(..., help="Generation bundle folder (runs/<run>/bundle)."),
    data: Path = typer.Option(None, "--data", help="The training data file, when it is no longer where the "
                              "bundle's config.yaml says (data.path); its other data settings still apply."),
    force: bool = _flag(False, "--force/--no-force", help="Replace the drafts the bundle already has, and build "
                        "them from a data file whose sha256 is not the one the bundle was trained on."),
):
    """Add drafts/ (the training replies, the datastore of speculative decoding) to a generation bundle trained
    without it: the training split is read again as the bundle's config made it, and written atomically."""
    from chatforge.bundle import BundleError
    from chatforge.training.bundle_drafts import add_drafts

    try:
        with err_console.status(f"reading the training replies for {escape(str(bundle))}"):
            added = add_drafts(bundle, data=data, force=force)
    except (BundleError, ValueError, OSError) as e:  # AddDraftsError, ConfigError, DataError are ValueErrors
        _fail(str(e))
    verb = "replaced" if added.replaced else "written"
    forced = "" if added.data_matches else ", not the file the bundle was trained on (--force)"
    console.print(f"drafts {verb}: [bold]{escape(str(added.folder))}[/] ({added.replies} training replies from "
                  f"{escape(str(added.data_path))}{forced}); speculative decoding uses them when the bundle is next "
                  f"loaded", highlight=False, soft_wrap=True)
