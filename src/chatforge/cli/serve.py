"""`chatforge serve`: parse the options into a ServerConfig, check the ports, run the server."""

from __future__ import annotations

from pathlib import Path

import typer

from chatforge.cli._shared import _fail, _flag, _parse_models, app


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


def _fail_serving(message: str, handlers_before: list, logged: bool = False) -> None:
    """Exit 2 with ``message``: one JSON error event once this server set its logging up as JSON (the image's
    default; every stderr line is then JSON, and log pipelines parse them; none when the server ``logged`` it
    already), else the CLI's one plain line."""
    import logging

    from chatforge.serving.observability import json_stderr_active

    root = logging.getLogger()
    if json_stderr_active(root) and any(all(h is not b for b in handlers_before) for h in root.handlers):
        if not logged:
            logging.getLogger("chatforge.cli").error(message)
        raise typer.Exit(2)
    _fail(message)


# ---------------------------------------------------------------------------- serve
@app.command()
def serve(
    bundles: list[Path] = typer.Argument(None, help="Bundle folders to serve (named after their run)."),
    model: list[str] = typer.Option([], "--model", help="NAME=BUNDLE_PATH (repeatable)."),
    # The image sets CHATFORGE_HOST=0.0.0.0, so arguments of one's own (which replace its command) still listen on
    # the container's interfaces; the flag wins over it.
    host: str = typer.Option("127.0.0.1", envvar="CHATFORGE_HOST", help="Interface to bind; 0.0.0.0 for all."),
    port: int = typer.Option(50051, help="Port; 0 picks a free one (see --port-file)."),
    port_file: Path = typer.Option(None, help="Write the bound port here once the server is SERVING."),
    grace: float = typer.Option(10.0, help="Seconds in-flight calls get to finish after SIGTERM."),
    drain_delay: float = typer.Option(5.0, help="Seconds after SIGTERM that readiness is NOT_SERVING while calls "
                                      "are still served, so balancers move traffic first (0 disables)."),
    model_dir: Path = typer.Option(None, "--model-dir", help="Serve DIR/<name>/<version>/ bundles; hot-swaps "
                                   "new versions (latest, or pinned by DIR/<name>/PINNED or --pin)."),
    pin: list[str] = typer.Option([], "--pin", help="NAME=VERSION to serve from --model-dir (rollback)."),
    poll_interval: float = typer.Option(5.0, help="Seconds between --model-dir scans."),
    # The image and the manifests set CHATFORGE_METRICS_PORT; the flag wins over it.
    metrics_port: int = typer.Option(None, envvar="CHATFORGE_METRICS_PORT",
                                     help="Serve /metrics, /healthz, /readyz over HTTP on this port."),
    http_port: int = typer.Option(None, help="Also serve the OpenAI-compatible HTTP API and the chat page "
                                  "(http://HOST:PORT/) on this port; same engine, keys and drain as gRPC."),
    max_running: int = typer.Option(8, help="Per model: sequences in the running batch."),
    max_queued: int = typer.Option(64, help="Per model: requests waiting beyond that (then RESOURCE_EXHAUSTED)."),
    max_batch_size: int = typer.Option(32, help="Classify: most texts per micro-batch."),
    max_wait_ms: float = typer.Option(0.0, help="Classify: longest wait for a micro-batch to fill; 0 (default): run what is queued as soon as the model is free (requests that arrive during a forward pass form the next batch)."),
    draft_tokens: int = typer.Option(None, help="Speculative greedy decoding: tokens drafted per step from the "
                                     "bundle's training replies and checked by the model in one step (the same "
                                     "replies in fewer steps; torch GPT and Transformer generators), 0-16; 0: off. "
                                     "Default: 4, and 0 for int8 models (a wider step rounds their activations "
                                     "differently, so replies would change)."),
    max_input_tokens: int = typer.Option(None, help="Cap on input tokens (besides each model's own)."),
    max_new_tokens: int = typer.Option(1024, help="Cap on max_new_tokens a request may ask for."),
    max_message_bytes: int = typer.Option(4 * 1024 * 1024, help="Largest gRPC message accepted or sent, and "
                                          "largest HTTP request body (413 above it)."),
    max_concurrent_streams: int = typer.Option(None, help="gRPC calls one connection may have open at once (HTTP/2 "
                                               "SETTINGS_MAX_CONCURRENT_STREAMS; a grpc client queues the rest). "
                                               "Default: --max-running + --max-queued + 16."),
    pipeline_classifier: str = typer.Option(None, help="Chatbot pipeline: classify with this model first, then "
                                            "fallback or generate (needs a generator; before a selection model "
                                            "use --policy)."),
    fallback_reply: str = typer.Option("Sorry, I can't help with that.",
                                       help="Pipeline: the reply to out-of-scope messages."),
    oos_threshold: float = typer.Option(0.0, help="Pipeline: scores below this count as out of scope."),
    policy: Path = typer.Option(None, help="Hybrid reply policy YAML (intent -> scripted -> retrieval above a "
                                "threshold -> generation -> fallback; see chatforge.serving.policy)."),
    api_keys_file: Path = typer.Option(None, help="File of API keys (one per line); else CHATFORGE_API_KEYS."),
    protect_health: bool = _flag(False, "--protect-health/--no-protect-health",
                                 help="Require API keys for health and reflection too."),
    tls_cert: Path = typer.Option(None, help="Server certificate chain (PEM) for TLS."),
    tls_key: Path = typer.Option(None, help="Server private key (PEM) for TLS."),
    tls_client_ca: Path = typer.Option(None, help="CA (PEM) that client certificates must chain to (mTLS)."),
    precision: str = typer.Option("fp32", help="Torch models' precision: fp32; bf16 (weights cast once at "
                                  "load; several times faster matmuls on CPUs with AMX/AVX512-BF16 and on GPUs); "
                                  "int8 (linear layers dynamically quantized at load); auto (the fastest this "
                                  "CPU supports, logged). At fp32 the environment variable CHATFORGE_FP32_LINEAR "
                                  "(auto, onednn, aten) picks the matmul of large linear layers; auto: oneDNN on "
                                  "AMD CPUs, torch's elsewhere."),
    backend: list[str] = typer.Option([], "--backend", help="torch (default) or ctranslate2: serve GPT generators "
                                      "and Transformer encoder-decoder generators (post-LN; pre-LN is refused) "
                                      "through CTranslate2 (converted at load; compute type from --precision: "
                                      "fp32 -> float32, int8 -> int8, bf16 -> bfloat16 where the CPU has it, "
                                      "auto -> int8; needs chatforge[ct2]); onnxruntime: serve BERT/Transformer "
                                      "classifiers through ONNX Runtime (exported at load; fp32, or int8 for "
                                      "int8/auto; needs chatforge[ort]). NAME=BACKEND sets one model's "
                                      "(repeatable)."),
):
    """Serve bundles over gRPC (Chatbot service, health, reflection) until SIGTERM/SIGINT/SIGHUP."""
    from chatforge.serving.backend_ct2 import parse_backends
    from chatforge.serving.engine import PipelineConfig
    from chatforge.serving.policy import ReplyPolicy
    from chatforge.serving.server import ServerConfig, run_server

    try:
        default_backend, model_backends = parse_backends(backend)
    except ValueError as e:
        _fail(str(e))
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
    import logging

    # run_server replaces them (configure_logging). The handlers themselves, not their ids: a replaced handler that
    # was freed could lend its id to its replacement, and the start-up error then came out as plain text in JSON mode.
    handlers_before = list(logging.getLogger().handlers)
    try:
        pipeline = PipelineConfig(pipeline_classifier, fallback_reply, oos_threshold) if pipeline_classifier else None
        reply_policy = ReplyPolicy.from_yaml(policy) if policy is not None else None
        config = ServerConfig(
            bundles=named or {}, model_dir=model_dir, pins=pins, poll_interval=poll_interval, host=host, port=port,
            port_file=port_file, grace=grace, drain_delay=drain_delay, metrics_port=metrics_port, http_port=http_port,
            api_keys_file=api_keys_file, open_health=not protect_health, tls_cert=tls_cert, tls_key=tls_key,
            tls_client_ca=tls_client_ca, max_message_bytes=max_message_bytes,
            max_concurrent_streams=max_concurrent_streams, precision=precision,
            backend=default_backend, backends=model_backends,
            max_running=max_running, max_queued=max_queued, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
            max_input_tokens=max_input_tokens, max_new_tokens=max_new_tokens, pipeline=pipeline,
            policy=reply_policy, draft_tokens=draft_tokens)
        code = run_server(config)
    except (ValueError, FileNotFoundError) as e:
        _fail_serving(str(e), handlers_before, logged=getattr(e, "chatforge_logged", False))
    except OSError as e:  # a port that is taken: one line naming it and its option, not a traceback
        _fail_serving(_bind_failure(e, host, port, metrics_port), handlers_before)
    raise typer.Exit(code or 0)
