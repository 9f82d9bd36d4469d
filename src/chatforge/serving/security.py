"""API keys and TLS for the gRPC server (the client side: chatforge.client.channel). Secrets are never logged.

* API keys: the client sends ``authorization: Bearer <key>`` metadata; the server compares
  it with every configured key using :func:`hmac.compare_digest` (constant time, and all
  keys are compared so timing does not reveal which one nearly matched). Keys come from a
  file (one per line, ``#`` comments) or the ``CHATFORGE_API_KEYS`` environment variable
  (comma-separated). Health checking and reflection may stay open (``open_health``) so a
  load balancer or ``grpcurl`` need no key.
* TLS: server certificate and key (PEM); with a client CA, clients must present a
  certificate signed by it (mutual TLS).
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)

API_KEYS_ENV = "CHATFORGE_API_KEYS"
AUTH_METADATA_KEY = "authorization"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class UnauthenticatedError(Exception):
    """The call carries no valid API key (UNAUTHENTICATED)."""


class ApiKeyAuth:
    """Checks ``authorization: Bearer <key>`` on every call except the open ones."""

    def __init__(self, keys: Iterable[str], *, open_health: bool = True) -> None:
        self._keys = [k.encode() for k in (k.strip() for k in keys) if k]
        if not self._keys:
            raise ValueError("no API keys given; pass at least one non-empty key (or disable API keys)")
        self.open_health = open_health

    def __repr__(self) -> str:  # never show the keys
        return f"ApiKeyAuth(<{len(self._keys)} keys>, open_health={self.open_health})"

    @classmethod
    def from_file(cls, path: str | Path, **kw) -> ApiKeyAuth:
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"cannot read API key file {path}: {e.strerror}") from None
        keys = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise ValueError(f"API key file {path} holds no keys; allowed: one key per line, # for comments")
        return cls(keys, **kw)

    @classmethod
    def from_env(cls, environ=None, **kw) -> ApiKeyAuth | None:
        raw = (os.environ if environ is None else environ).get(API_KEYS_ENV, "")
        keys = [k for k in raw.split(",") if k.strip()]
        return cls(keys, **kw) if keys else None

    def is_open(self, rpc: str) -> bool:
        return self.open_health and rpc.startswith(OPEN_PREFIXES)

    def check(self, rpc: str, metadata, *, http: bool = False) -> None:
        """Raise :class:`UnauthenticatedError` unless ``metadata`` carries a valid key (``http``: the key
        came as an HTTP header, and the messages say so)."""
        if self.is_open(rpc):
            return
        given = None
        for key, value in metadata or ():
            if key == AUTH_METADATA_KEY and isinstance(value, str):
                given = value
                break
        if given is None:
            where = "the header 'Authorization: Bearer <key>'" if http else "metadata 'authorization: Bearer <key>'"
            raise UnauthenticatedError(f"missing API key; send {where}")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            where = "Authorization header" if http else "authorization metadata"
            raise UnauthenticatedError(f"malformed {where}; expected 'Bearer <key>'")
        candidate = token.strip().encode()
        ok = False
        for k in self._keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(candidate, k)
        if not ok:
            raise UnauthenticatedError("invalid API key")


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS: certificate chain and key (PEM files); ``client_ca`` turns on mutual TLS."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def check(self) -> None:
        """Load the files as a TLS server would (Python's ssl), raising ValueError naming the file and what is
        wrong: unreadable, not PEM, or a key that does not belong to the certificate. grpc reports all of these
        only when the port is bound, as a failed bind, so the server said the port was in use."""
        import ssl

        for path, what in ((self.cert_file, "--tls-cert"), (self.key_file, "--tls-key"),
                           (self.client_ca_file, "--tls-client-ca")):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{what} {path}: no such file")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"--tls-cert {self.cert_file} / --tls-key {self.key_file}: cannot be loaded as a "
                             f"PEM certificate chain and its private key ({getattr(e, 'reason', None) or e})") \
                from None
        if self.client_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=str(self.client_ca_file))
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"--tls-client-ca {self.client_ca_file}: not PEM CA certificates "
                                 f"({getattr(e, 'reason', None) or e})") from None

    def server_credentials(self):
        def read(p: Path, what: str) -> bytes:
            try:
                return Path(p).read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read TLS {what} {p}: {e.strerror}") from None

        ca = read(self.client_ca_file, "client CA") if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(read(self.key_file, "key"), read(self.cert_file, "certificate"))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )
