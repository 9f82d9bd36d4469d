"""The thin gRPC servicer: proto in, engine call, proto out.

Validation errors and engine errors are raised as the engine's exceptions;
:mod:`chatforge.serving.interceptors` maps them to status codes in one place, so
this servicer must be installed together with ``RequestContextInterceptor``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct
import time
from contextlib import aclosing

from chatforge.context import TRAFFIC_KINDS, TRAFFIC_METADATA_KEY, request_id_var, session_id_var
from chatforge.decoding import GenerationOptions
from chatforge.inference import TokenDelta
from chatforge.serving.engine import Engine, EngineUnavailableError, InvalidRequestError
from chatforge.serving.interceptors import check_session_id, current_call
from chatforge.serving.store import Turn
from chatforge.v1 import chatbot_pb2 as pb
from chatforge.v1 import chatbot_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Chatbot"].full_name  # "chatforge.v1.Chatbot"

_OPTION_FIELDS = (
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "repetition_penalty",
    "num_beams",
    "length_penalty",
    "no_repeat_ngram_size",
    "frequency_penalty",
    "presence_penalty",
)
_SUPPORTED = {f.name for f in dataclasses.fields(GenerationOptions)}
MAX_BEAMS = getattr(GenerationOptions, "MAX_BEAMS", 16)


class ModelsLoadingError(EngineUnavailableError):
    """The server is up but its models are not loaded yet (UNAVAILABLE: retry shortly)."""


def float32_as_sent(value: float) -> float:
    """The shortest decimal whose float32 is ``value`` (a proto ``float`` widened to a Python float):
    the number the caller wrote, e.g. 0.7 for 0.699999988079071, 1e-30 for 1.0000000031710769e-30."""
    if not math.isfinite(value):
        return value
    for digits in range(1, 10):  # 9 significant digits always round-trip a float32
        candidate = float(f"{value:.{digits}g}")
        try:
            if struct.unpack("<f", struct.pack("<f", candidate))[0] == value:
                return candidate
        except OverflowError:  # rounded past float32's largest value: take more digits
            continue
    return value


def options_from_proto(msg: pb.GenerationOptions, max_new_tokens_cap: int | None = None) -> GenerationOptions:
    """Proto options -> validated :class:`GenerationOptions`; unset fields keep their defaults.

    ``num_beams``/``length_penalty`` are validated by GenerationOptions when the decoder has
    beam search; otherwise num_beams > 1 is refused here.
    """
    fields = {name: getattr(msg, name) for name in _OPTION_FIELDS if msg.HasField(name)}
    for name in ("temperature", "top_p", "repetition_penalty", "length_penalty", "frequency_penalty",
                 "presence_penalty"):
        # proto floats are float32: take the shortest decimal that is the same float32, so that 0.7
        # is checked and reported as 0.7 (not 0.699999988) and 1e-30 stays 1e-30. Never a fixed
        # number of decimals: round(1e-30, 6) is 0.0, which would reject a value inside the range.
        if name in fields:
            fields[name] = float32_as_sent(fields[name])
    if "num_beams" not in _SUPPORTED:  # a decoder without beam search: check here, then drop
        beams = fields.pop("num_beams", 1)
        fields.pop("length_penalty", None)
        if not 1 <= beams <= MAX_BEAMS:
            raise InvalidRequestError(
                f"options.num_beams={beams!r} is out of range; allowed: an integer in [1, {MAX_BEAMS}]")
        if beams > 1:
            raise InvalidRequestError("options.num_beams > 1: beam search is not available on this server")
    if "max_new_tokens" not in fields and max_new_tokens_cap is not None:
        fields["max_new_tokens"] = min(GenerationOptions.max_new_tokens, max_new_tokens_cap)
    try:
        return GenerationOptions(**fields).validate()
    except ValueError as e:
        raise InvalidRequestError(f"options.{e}") from None


def _use_session_id(session_id: str, call) -> None:
    """``ReplyRequest.session_id`` is the conversation's id; set it for the store, logs and the
    interceptor's call line. Empty: keep the ``x-session-id`` header's value (the fallback)."""
    if not session_id:
        return
    check_session_id(session_id, "session_id")
    session_id_var.set(session_id)  # the interceptor resets it when the call ends
    if call is not None:
        call.session_id = session_id


def traffic_of(metadata) -> str | None:
    """The call's synthetic-traffic mark (the ``x-chatforge-traffic`` header, e.g. "loadtest" from ``chatforge
    loadtest``), stored with its turn so that exports can leave it out; None for real traffic. An unknown value is
    refused rather than stored as real: a typo would otherwise put a load test's turns into the training data."""
    value = None
    for key, v in metadata or ():
        if key.lower() == TRAFFIC_METADATA_KEY:
            value = v
    if value is None:
        return None
    if value not in TRAFFIC_KINDS:
        raise InvalidRequestError(f"{TRAFFIC_METADATA_KEY} header {value[:64]!r} is unknown; allowed: "
                                  f"{', '.join(TRAFFIC_KINDS)} (or no header: real traffic)")
    return value


def _call_traffic(context) -> str | None:
    metadata = getattr(context, "invocation_metadata", None)
    return traffic_of(metadata() if metadata is not None else ())


def _metadata_str(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


class ChatbotServicer(pb_grpc.ChatbotServicer):
    """Implements ``chatforge.v1.Chatbot`` on top of an :class:`Engine`.

    ``engine`` may be None while the server loads its models; calls then fail with
    UNAVAILABLE (retryable) and health reports NOT_SERVING. ``store`` (a
    :class:`chatforge.serving.store.ConversationStore`) records every acknowledged turn, a load test's
    flagged as such (see :func:`traffic_of`).
    """

    def __init__(self, engine: Engine | None = None, store=None) -> None:
        self.engine = engine
        self.store = store

    def _engine(self) -> Engine:
        if self.engine is None:
            raise ModelsLoadingError("the server is still loading its models; retry shortly")
        return self.engine

    def _record(self, **fields) -> None:
        if self.store is None:
            return
        self.store.record(Turn(session_id=session_id_var.get(), request_id=request_id_var.get(), **fields))

    async def Reply(self, request: pb.ReplyRequest, context) -> None:
        engine = self._engine()
        start = time.perf_counter()
        call = current_call.get()
        traffic = _call_traffic(context)
        _use_session_id(request.session_id, call)
        options = options_from_proto(request.options, engine.max_new_tokens)
        name = request.model or engine.default_generator or ""
        if call is not None and name in engine.generators:
            call.set_model(name)
        parts: list[str] = []
        # Written with context.write (not `yield`) so that the engine's stream is closed
        # deterministically by `aclosing` when the client cancels: the cancellation reaches
        # this coroutine, `aclosing` closes the engine's generator, which drops the sequence.
        turns = [(t.role, t.text) for t in request.context]
        engine.check_context(turns)
        stream = engine.stream_reply(request.text, options, request.model or None, [t for _, t in turns])
        async with aclosing(stream):
            async for item in stream:
                if isinstance(item, TokenDelta):
                    if call is not None:
                        call.token()
                    parts.append(item.text)
                    await context.write(pb.ReplyChunk(delta=pb.ReplyDelta(text=item.text, token_id=item.token_id)))
                    continue
                if call is not None:
                    call.answered(item.model, item.path, item.finish_reason, item.out_of_scope)
                await context.write(pb.ReplyChunk(final=pb.ReplyFinal(
                    finish_reason=item.finish_reason,
                    prompt_tokens=item.prompt_tokens,
                    completion_tokens=item.completion_tokens,
                    model=item.model,
                    request_id=request_id_var.get() or "",
                    model_version=item.version,
                    intent=item.intent,
                    intent_score=item.intent_score,
                    path=item.path,
                    path_score=item.path_score,
                    context_turns=item.context_turns,
                    out_of_scope=item.out_of_scope,
                )))
                # Acknowledged: the final chunk is on its way to the client.
                self._record(model=item.model, model_version=item.version, user_text=request.text,
                             reply="".join(parts), intent=item.intent or None,
                             intent_score=item.intent_score if item.intent else None,
                             ttft_ms=call.ttft_ms if call is not None else None,
                             latency_ms=(time.perf_counter() - start) * 1000.0, status="OK",
                             context=[{"role": r, "text": t} for r, t in turns] or None,
                             context_turns=item.context_turns, path=item.path or None, traffic=traffic)

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        engine = self._engine()
        start = time.perf_counter()
        call = current_call.get()
        traffic = _call_traffic(context)
        name = request.model or engine.default_classifier or ""
        if call is not None and name in engine.classifiers:
            call.set_model(name)
        [pred], hosted = await engine.classify_with_model([request.text], request.model or None)
        self._record(model=hosted.name, model_version=str(hosted.info.version), user_text=request.text,
                     intent=pred.label, intent_score=pred.score,
                     latency_ms=(time.perf_counter() - start) * 1000.0, status="OK", traffic=traffic)
        return pb.ClassifyResponse(
            label=pred.label,
            score=pred.score,
            scores=pred.scores,
            out_of_scope=pred.out_of_scope,
            model=hosted.name,
            model_version=str(hosted.info.version),
        )

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        engine = self._engine()
        return pb.ListModelsResponse(
            models=[
                pb.ModelDescription(
                    name=m.name,
                    family=m.info.family,
                    task=m.info.task,
                    version=str(m.info.version),
                    metadata={str(k): _metadata_str(v) for k, v in m.info.metadata.items()},
                    is_default=m.is_default,
                )
                for m in engine.models()
            ]
        )
