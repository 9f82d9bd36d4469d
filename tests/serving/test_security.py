"""TLS, mutual TLS and API keys; health stays open by option; keys never logged."""

from __future__ import annotations

import datetime as dt
import json
import logging

import grpc
import pytest
from tests.serving_fakes import WAIT, ServerThread, make_engine

from chatforge.client import ChatbotClient, ChatbotError
from chatforge.serving.security import ApiKeyAuth, TlsConfig

KEY = "sk-test-0123456789abcdef"


def _certs(tmp_path):
    """A throwaway CA, a server cert for 127.0.0.1/localhost, a client cert (cryptography)."""
    pytest.importorskip("cryptography", reason="the cryptography package generates the test certificates")
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def make(name, issuer=None, issuer_key=None, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca = make("test-ca", ca=True)
    srv_key, srv = make("localhost", ca.subject, ca_key,
                        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cli_key, cli = make("client", ca.subject, ca_key)
    out = {}
    for name, obj in (("ca", ca), ("server", srv), ("client", cli)):
        p = tmp_path / f"{name}.pem"
        p.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        out[name] = p
    for name, key in (("server_key", srv_key), ("client_key", cli_key)):
        p = tmp_path / f"{name}.pem"
        p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        out[name] = p
    return out


def test_api_keys_unauthenticated_then_ok_and_health_open(caplog):
    auth = ApiKeyAuth(["other-key", KEY])
    assert KEY not in repr(auth)
    with caplog.at_level(logging.DEBUG), ServerThread(make_engine(), auth=auth) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT) as anon:
            assert anon.health("chatforge.v1.Chatbot") == "SERVING"  # open for balancers
            with pytest.raises(ChatbotError) as err:
                anon.reply("hello")
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in err.value.details
        with ChatbotClient(st.target, timeout=WAIT, api_key="wrong") as bad:
            with pytest.raises(ChatbotError) as err:
                bad.classify("hello")
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and err.value.details == "invalid API key"
        with ChatbotClient(st.target, timeout=WAIT, api_key=KEY) as good:
            assert good.reply("hello", max_new_tokens=1) == "Hel"
    assert all(KEY not in r.getMessage() and KEY not in str(vars(r)) for r in caplog.records)


def test_health_can_require_keys_too():
    with ServerThread(make_engine(), auth=ApiKeyAuth([KEY], open_health=False)) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT) as anon, pytest.raises(ChatbotError) as err:
            anon.health()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_api_key_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# ops keys\nk1\n\nk2\n")
    auth = ApiKeyAuth.from_file(f)
    auth.check("/chatforge.v1.Chatbot/Reply", [("authorization", "Bearer k2")])
    f.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no keys"):
        ApiKeyAuth.from_file(f)
    assert ApiKeyAuth.from_env({}) is None


def test_tls_and_mutual_tls(tmp_path):
    c = _certs(tmp_path)
    tls = TlsConfig(c["server"], c["server_key"])
    with ServerThread(make_engine(), tls=tls) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT, ca_file=c["ca"]) as client:
            assert client.reply("hello", max_new_tokens=1) == "Hel"
        with ChatbotClient(st.target, timeout=3, options=[("grpc.enable_retries", 0)]) as plain:
            with pytest.raises(ChatbotError) as err:
                plain.health()  # plaintext against a TLS port
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    mtls = TlsConfig(c["server"], c["server_key"], client_ca_file=c["ca"])
    with ServerThread(make_engine(), tls=mtls) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT, ca_file=c["ca"], cert_file=c["client"],
                           key_file=c["client_key"]) as client:
            assert client.reply("hello", max_new_tokens=1) == "Hel"
        with ChatbotClient(st.target, timeout=3, ca_file=c["ca"], options=[("grpc.enable_retries", 0)]) as anon:
            with pytest.raises(ChatbotError) as err:
                anon.health()  # no client certificate
            assert err.value.code == grpc.StatusCode.UNAVAILABLE


# -------------------------------------------- the CLI clients authenticate (issue 12, item 9)
def _cli(args, env=None):
    from typer.testing import CliRunner

    from chatforge.cli import app

    return CliRunner().invoke(app, args, env={"CHATFORGE_API_KEY": None, **(env or {})})


def test_cli_clients_send_the_api_key_from_option_or_env_and_never_print_it():
    with ServerThread(make_engine(), auth=ApiKeyAuth([KEY], open_health=False)) as st:
        st.wait_serving()
        t = st.target
        r = _cli(["health", t])
        assert r.exit_code == 1 and "UNAUTHENTICATED" in r.output
        runs = [
            _cli(["health", t, "--service", "chatforge.v1.Chatbot"], env={"CHATFORGE_API_KEY": KEY}),
            _cli(["health", t, "--api-key", KEY]),
            _cli(["chat", t, "-m", "hello", "--max-new-tokens", "1"], env={"CHATFORGE_API_KEY": KEY}),
            _cli(["loadtest", t, "--rpc", "classify", "-n", "3", "--api-key", KEY]),
            _cli(["loadtest", t, "--rpc", "reply", "-n", "2", "--max-new-tokens", "1"], env={"CHATFORGE_API_KEY": KEY}),
        ]
        for r in runs:
            assert r.exit_code == 0, r.output
            assert KEY not in r.output
        assert "SERVING" in runs[0].output and "Hel" in runs[2].output
        assert "ok / errors" in runs[3].output and "3 / 0" in runs[3].output
        r = _cli(["chat", t, "-m", "hello"], env={"CHATFORGE_API_KEY": "wrong-key"})
        assert r.exit_code == 1 and "invalid API key" in r.output and "wrong-key" not in r.output
        # The load test's error summary: the count in red, then the server's message as sent (it printed the
        # markup itself, "[red]2 x[/] UNAUTHENTICATED ...", before).
        r = _cli(["loadtest", t, "--rpc", "classify", "-n", "2"])
        assert "2 x UNAUTHENTICATED: missing API key" in r.output and "[red]" not in r.output, r.output
        # The message a user typed is echoed as typed ("[/x]" raised MarkupError before the request was sent).
        r = _cli(["chat", t, "-m", "[/x] hi", "--max-new-tokens", "1"], env={"CHATFORGE_API_KEY": KEY})
        assert r.exit_code == 0 and "you> [/x] hi" in r.output, r.output
    help_ = _cli(["health", "--help"], env={"CHATFORGE_API_KEY": KEY, "COLUMNS": "200"})
    assert "CHATFORGE_API_KEY" in help_.output and KEY not in help_.output


def test_cli_clients_connect_over_tls_and_mutual_tls(tmp_path):
    c = _certs(tmp_path)
    with ServerThread(make_engine(), tls=TlsConfig(c["server"], c["server_key"], client_ca_file=c["ca"])) as st:
        st.wait_serving()
        mtls = ["--tls-ca", str(c["ca"]), "--tls-cert", str(c["client"]), "--tls-key", str(c["client_key"])]
        r = _cli(["health", st.target, *mtls])
        assert r.exit_code == 0 and "SERVING" in r.output, r.output
        r = _cli(["chat", st.target, "-m", "hello", "--max-new-tokens", "1", *mtls])
        assert r.exit_code == 0 and "Hel" in r.output, r.output
        r = _cli(["loadtest", st.target, "--rpc", "health", "-n", "2", *mtls])
        assert r.exit_code == 0, r.output
        r = _cli(["health", st.target, "--tls-ca", str(c["ca"]), "--timeout", "2"])  # no client certificate
        assert r.exit_code == 1
        r = _cli(["health", st.target, "--tls-ca", str(c["ca"]), "--tls-cert", str(c["client"])])
        assert r.exit_code == 2 and "--tls-key" in r.output


def test_top_sends_the_api_key_with_each_scrape():
    import http.server
    import threading

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            seen.append(self.headers.get("Authorization"))
            body = b"chatforge_requests_running 1\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        target = f"127.0.0.1:{httpd.server_address[1]}"
        r = _cli(["top", target, "--count", "1", "--interval", "0.01"], env={"CHATFORGE_API_KEY": KEY})
        assert r.exit_code == 0, r.output
        assert KEY not in r.output
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert seen == [f"Bearer {KEY}"]


def test_a_client_ca_without_a_server_certificate_is_refused(tmp_path):
    """--tls-client-ca alone served plaintext and checked no client: the server logged "tls": false and answered a
    plaintext client, while the operator had asked for mutual TLS."""
    from chatforge.serving.server import ServerConfig

    certs = _certs(tmp_path)
    with pytest.raises(ValueError, match="--tls-client-ca .*needs --tls-cert and --tls-key"):
        ServerConfig(bundles={"chat": tmp_path}, tls_client_ca=certs["ca"])


@pytest.mark.parametrize("case", ["key-of-another-cert", "garbage-cert", "garbage-ca", "missing-key"])
def test_bad_tls_files_are_named_before_the_port_is_bound(tmp_path, case):
    """A key that does not match its certificate, or a file that is not PEM, made grpc fail the bind, and serve said
    the port was already in use."""
    from chatforge.serving.server import ServerConfig

    certs = _certs(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage\n")
    cert, key, ca = certs["server"], certs["server_key"], None
    if case == "key-of-another-cert":
        key = certs["client_key"]
    elif case == "garbage-cert":
        cert = garbage
    elif case == "garbage-ca":
        ca = garbage
    else:
        key = tmp_path / "nope.pem"
    with pytest.raises(ValueError) as err:
        ServerConfig(bundles={"chat": tmp_path}, tls_cert=cert, tls_key=key, tls_client_ca=ca)
    message = str(err.value)
    assert "port" not in message and ("--tls-" in message), message
    # the good files pass
    ServerConfig(bundles={"chat": tmp_path}, tls_cert=certs["server"], tls_key=certs["server_key"],
                 tls_client_ca=certs["ca"])


def test_the_listening_line_says_whether_api_keys_are_on(caplog):
    """The line logged "api_keys": "***" whether or not keys were configured: the log redacts fields named like
    secrets, so it could not tell an operator whether the server checks keys."""
    from chatforge.serving.observability import JsonFormatter

    lines = {}
    for auth in (None, ApiKeyAuth([KEY])):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="chatforge.serving.server"), \
                ServerThread(make_engine(), auth=auth) as st:
            st.wait_serving()
        record = next(r for r in caplog.records if r.getMessage() == "listening")
        lines[auth is not None] = json.loads(JsonFormatter().format(record))
    assert (lines[False]["auth"], lines[True]["auth"]) == ("none", "api_keys")
    assert KEY not in json.dumps(lines[True])
