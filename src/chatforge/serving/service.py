"""The thin gRPC servicer: proto in, engine call, proto out.

Validation errors and engine errors are raised as the engine's exceptions;
:mod:`chatforge.serving.interceptors` maps them to status codes in one place, so
this servicer must be installed together with ``RequestContextInterceptor``.
"""

from __future__ import annotations

import json
import logging
from contextlib import aclosing

from chatforge.context import request_id_var
from chatforge.decoding import GenerationOptions
from chatforge.inference import TokenDelta
from chatforge.serving.engine import Engine, EngineUnavailableError, InvalidRequestError
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
)


class ModelsLoadingError(EngineUnavailableError):
    """The server is up but its models are not loaded yet (UNAVAILABLE: retry shortly)."""


def options_from_proto(msg: pb.GenerationOptions) -> GenerationOptions:
    """Proto options -> validated :class:`GenerationOptions`; unset fields keep their defaults."""
    fields = {name: getattr(msg, name) for name in _OPTION_FIELDS if msg.HasField(name)}
    for name in ("temperature", "top_p", "repetition_penalty"):
        # proto floats are float32: round so that 0.7 is reported as 0.7, not 0.699999988.
        if name in fields:
            fields[name] = round(fields[name], 6)
    try:
        return GenerationOptions(**fields).validate()
    except ValueError as e:
        raise InvalidRequestError(f"options.{e}") from None


def _metadata_str(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


class ChatbotServicer(pb_grpc.ChatbotServicer):
    """Implements ``chatforge.v1.Chatbot`` on top of an :class:`Engine`.

    ``engine`` may be None while the server loads its models; calls then fail with
    UNAVAILABLE (retryable) and health reports NOT_SERVING.
    """

    def __init__(self, engine: Engine | None = None) -> None:
        self.engine = engine

    def _engine(self) -> Engine:
        if self.engine is None:
            raise ModelsLoadingError("the server is still loading its models; retry shortly")
        return self.engine

    async def Reply(self, request: pb.ReplyRequest, context) -> None:
        engine = self._engine()
        options = options_from_proto(request.options)
        if request.session_id:
            logger.debug("reply", extra={"session_id": request.session_id})
        # Written with context.write (not `yield`) so that the engine's stream is closed
        # deterministically by `aclosing` when the client cancels: the cancellation reaches
        # this coroutine, `aclosing` closes the engine's generator, which stops the worker.
        stream = engine.stream_reply(request.text, options, request.model or None)
        async with aclosing(stream):
            async for item in stream:
                if isinstance(item, TokenDelta):
                    chunk = pb.ReplyChunk(delta=pb.ReplyDelta(text=item.text, token_id=item.token_id))
                else:
                    chunk = pb.ReplyChunk(
                        final=pb.ReplyFinal(
                            finish_reason=item.finish_reason,
                            prompt_tokens=item.prompt_tokens,
                            completion_tokens=item.completion_tokens,
                            model=item.model,
                            request_id=request_id_var.get() or "",
                        )
                    )
                await context.write(chunk)

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        engine = self._engine()
        [pred] = await engine.classify([request.text], request.model or None)
        return pb.ClassifyResponse(
            label=pred.label,
            score=pred.score,
            scores=pred.scores,
            out_of_scope=pred.out_of_scope,
            model=request.model or engine.default_classifier or "",
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
