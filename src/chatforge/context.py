"""Per-request context shared by the client, the API layer and the engine.

A request id travels as the ``x-request-id`` gRPC metadata key; the server's
interceptor puts it into :data:`request_id_var` so that every log line written
while the request is handled (API and engine alike) carries it.
"""

from __future__ import annotations

import contextvars
import re
import uuid

REQUEST_ID_METADATA_KEY = "x-request-id"
SESSION_ID_METADATA_KEY = "x-session-id"
# The longest session id a request may carry, in its field or its header (the store's session_id column); a
# longer one is refused, never cut: two ids sharing their first 128 characters would merge two conversations.
MAX_SESSION_ID_CHARS = 128

# Marks a call as synthetic traffic (the value names what made it; only TRAFFIC_KINDS are accepted): the server
# still answers and stores it like any other, flagged in the store's ``traffic`` column, and ``conversations
# export`` leaves flagged turns out unless asked for them. ``chatforge loadtest`` sends it with every call.
TRAFFIC_METADATA_KEY = "x-chatforge-traffic"
LOADTEST_TRAFFIC = "loadtest"
TRAFFIC_KINDS = (LOADTEST_TRAFFIC,)

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
session_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)


# A request id a caller may choose: it is written into every log line of the call, so only short, plain ids; the
# server replaces any other with one of its own, and gRPC refuses a header value outside printable ASCII.
REQUEST_ID_CHARS = "1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def is_valid_request_id(value: object) -> bool:
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex


# The conversation's earlier turns one Reply may carry (ReplyRequest.context, the HTTP API's messages before
# the input), and their roles: the server checks them, clients send at most this many.
MAX_CONTEXT_TURNS = 64
CONTEXT_ROLES = ("user", "assistant")
