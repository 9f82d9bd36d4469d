"""Operations commands, run beside a server: chat, health, loadtest, top, conversations."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from chatforge.cli._shared import _check_seconds, _fail, _flag, app, console, err_console

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
    repetition_penalty: float = typer.Option(1.0, help="Penalty on tokens already generated, in [1, 10]; 1: none."),
    no_repeat_ngram: int = typer.Option(0, help="Never repeat an n-gram of this size in a reply; 0: off."),
    frequency_penalty: float = typer.Option(0.0, help="OpenAI's: a token loses this x its count in the reply so "
                                            "far, in [-2, 2]; 0: none."),
    presence_penalty: float = typer.Option(0.0, help="OpenAI's: a token loses this once it is in the reply, "
                                           "in [-2, 2]; 0: none."),
    timeout: float = typer.Option(30.0, help="Deadline per reply, seconds."),
    context: bool = _flag(True, "--context/--no-context", help="Send this conversation's earlier turns (the "
                          "latest 64) with each message; a model trained with context reads them."),
    api_key: str = _api_key_option(),
    tls: bool = _tls_option(),
    tls_ca: Path = _tls_ca_option(),
    tls_cert: Path = _tls_cert_option(),
    tls_key: Path = _tls_key_option(),
):
    """Chat with a server in the terminal; replies print as they stream."""
    from chatforge.client import ChatbotClient, ChatbotError
    from chatforge.context import MAX_CONTEXT_TURNS

    _check_seconds("--timeout", timeout)
    creds = _client_kwargs(api_key, tls, tls_ca, tls_cert, tls_key)

    opts = dict(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram,
                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)

    history: list[tuple[str, str]] = []

    def turn(client: ChatbotClient, text: str) -> None:
        console.print("[bold green]bot>[/] ", end="")
        final, parts = None, []
        sent = history[-MAX_CONTEXT_TURNS:] if context else []
        for chunk in client.reply_stream(text, model=model, session_id=session_id, context=sent, **opts):
            if chunk.text:
                parts.append(chunk.text)
                console.print(chunk.text, end="", highlight=False, markup=False)
            if chunk.finish_reason:
                final = chunk
        console.print()
        reply = "".join(parts)
        history.append(("user", text))
        if reply.strip():  # an empty reply is no turn (the server refuses empty context texts)
            history.append(("assistant", reply))
        if final is not None and ((final.path and final.path != "generation") or final.finish_reason == "fallback"):
            # a whole reply chosen, not generated (its token counts are 0): who chose it, and why
            what = final.path or "fallback"
            why = ", out of scope" if final.out_of_scope else (
                f", score {final.path_score:.3g}" if what == "retrieval" else "")
            console.print(f"[dim]({what} by {escape(final.model)} v{escape(final.model_version)}{why})[/]",
                          highlight=False)
        elif final is not None:
            read = f", read {final.context_turns} earlier turns" if final.context_turns else ""
            console.print(f"[dim]({final.completion_tokens} tokens, {final.finish_reason}{read})[/]")

    try:
        with ChatbotClient(target, timeout=timeout, **creds) as client:
            if message:
                for m in message:
                    console.print(f"[bold cyan]you>[/] {escape(m)}", highlight=False)
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
                        err_console.print(f"[red]{escape(str(e))}[/]", highlight=False)
    except ChatbotError as e:
        _fail(str(e), code=1)
    except ValueError as e:  # e.g. a malformed target
        _fail(str(e))


@app.command()
def health(
    target: str = typer.Argument(..., help="HOST:PORT"),
    service: list[str] = typer.Option(
        [""], help="Service name; '' is the whole server (liveness), chatforge.v1.Chatbot readiness. Repeat it to "
                   "check several on one connection: exit 0 only when every one is SERVING."),
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
    statuses: list[tuple[str, str]] = []
    try:
        with ChatbotClient(target, timeout=timeout, **creds) as client:
            for name in dict.fromkeys(service):  # in order, each once
                statuses.append((name, client.health(name)))
    except ChatbotError as e:
        err_console.print(f"{target}: {e}", highlight=False, markup=False, soft_wrap=True)  # one line
        raise typer.Exit(1) from None
    except ValueError as e:  # e.g. a malformed target
        _fail(str(e))
    for name, status in statuses:
        console.print(f"{target} {name or '(server)'}: {status}")
    raise typer.Exit(0 if all(status == "SERVING" for _, status in statuses) else 1)


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
        # Tokens a model generated (the server's count): whole scripted/retrieval replies generate none.
        t.add_row("tokens generated (by models)", str(tok["total"]))
        t.add_row("generated tokens/s (all streams)", f"{tok['per_second']:.1f}")
        if tok["stream_decode_rate_mean"] is not None:
            t.add_row("generated tokens/s per stream (mean)", f"{tok['stream_decode_rate_mean']:.1f}")
        paths = tok.get("replies_by_path") or {}
        if set(paths) - {"generation", "unknown"}:  # say how many replies no model generated
            t.add_row("replies by path", ", ".join(f"{p} {n}" for p, n in paths.items()))
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
        err_console.print(f"[red]{n} x[/] {escape(msg)}", highlight=False)
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
        check_slos_apply,
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
        check_slos_apply(slos, cfg.rpc)
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
    failed = [r for r in reports if r.ok == 0 and r.errors > 0]
    if failed:  # a run where nothing succeeded is not a measurement, SLO or not
        err_console.print(f"no request succeeded ({failed[0].errors} errors; their status codes are above)",
                          style="bold red", markup=False, highlight=False)
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

    samples = monitor.watch(count)
    try:
        # The first scrape before the table: a target that does not answer is one error line, not an empty table.
        first = next(samples, None)
        if first is None:
            return
        rows.append((_time.strftime("%H:%M:%S"), first))
        with Live(render(), console=console, auto_refresh=False) as live:
            for sample in samples:
                rows.append((_time.strftime("%H:%M:%S"), sample))
                live.update(render(), refresh=True)
    except MonitorError as e:
        _fail(str(e), code=1)
    except KeyboardInterrupt:
        pass


# -------------------------------------------------------------------- conversations
conversations_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The conversation store.")
app.add_typer(conversations_app, name="conversations")


def _parse_since(value: str):
    """ISO date/time (naive = UTC) or a relative age such as 30m, 24h, 7d; returned in UTC."""
    import re
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    max_days = (now - datetime.min.replace(tzinfo=timezone.utc)).days

    def out_of_range() -> None:
        _fail(f"--since {value!r} is out of range; allowed: a date/time from 0001-01-01 to 9999-12-31 (UTC), "
              f"or an age up to {max_days}d ({max_days * 24}h)")

    m = re.fullmatch(r"\s*(\d+)\s*([mhd])\s*", value)
    if m:
        unit = {"m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        try:
            return now - timedelta(**{unit: int(m.group(1))})
        except (OverflowError, ValueError):  # before year 1, or more digits than int() reads
            out_of_range()
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"--since {value!r} is not understood; allowed: an ISO date/time (2026-01-31, "
              "2026-01-31T12:00:00+09:00) or an age such as 30m, 24h, 7d")
    try:  # 0001-01-01T00:00+01:00 is before year 1 in UTC
        return dt.astimezone(timezone.utc) if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)
    except OverflowError:
        out_of_range()


@conversations_app.command("export")
def conversations_export(
    url: str = typer.Option(..., "--url", help="Store URL, e.g. sqlite:///runs/conversations.db or postgresql+psycopg://..."),
    out: Path = typer.Option(..., "--out", help="File to write (atomically)."),
    fmt: str = typer.Option(None, "--format", help="jsonl or csv (default: csv for an --out ending in .csv, "
                            "else jsonl)."),
    since: str = typer.Option(None, "--since", help="Only turns at/after this ISO time, or an age (24h, 7d)."),
    synthetic: bool = typer.Option(False, "--include-synthetic/--no-include-synthetic",
                                   help="Also export turns of synthetic traffic (chatforge loadtest's calls, column "
                                        "traffic); left out by default."),
):
    """Export stored turns to JSONL/CSV for the next training round. Only reads the database."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from chatforge.serving.store import EXPORT_FORMATS, NotAConversationStore, StoreUnreadable, export_store

    if fmt is None:  # the file's suffix says what the user expects in it
        fmt = "csv" if out.suffix.lower() == ".csv" else "jsonl"
    if fmt not in EXPORT_FORMATS:
        _fail(f"--format {fmt!r} is unknown; allowed: {', '.join(EXPORT_FORMATS)}")
    if out.is_dir():
        _fail(f"--out {out} is a directory; give the file to write, e.g. --out {out / ('turns.' + fmt)}")
    try:
        parsed = make_url(url)
    except ArgumentError:
        _fail(f"--url {url!r} is not a database URL; e.g. sqlite:///runs/conversations.db")
    # The export only reads (a SQLite file is opened read-only): a mistyped path is no database, not an empty one.
    db = parsed.database
    if parsed.get_backend_name() == "sqlite" and db and db != ":memory:" and not Path(db).is_file():
        _fail(f"no conversation database at {db}")
    since_dt = _parse_since(since) if since else None
    where = parsed.render_as_string(hide_password=True)
    try:
        n = export_store(url, out, format=fmt, since=since_dt, include_synthetic=synthetic)
    except NotAConversationStore as e:
        _fail(str(e))
    except StoreUnreadable as e:
        _fail(f"cannot read the conversation store: {e}", code=1)
    except (SQLAlchemyError, ModuleNotFoundError) as e:
        # the driver's own message, without SQLAlchemy's [SQL: ...] and "Background on this error" lines
        reason = getattr(e, "orig", None) or e
        _fail(f"cannot read the conversation store at {where}: {reason}", code=1)
    except OSError as e:  # the output: a folder that cannot be made, no permission, a full disk
        _fail(f"cannot write --out {out}: {e.strerror or e}", code=1)
    console.print(f"exported {n} turns to [bold]{out}[/]", highlight=False)
