"""The client side: what talks to a chatforge server from beside it, never inside it.

``ChatbotClient`` (:mod:`.channel`: one gRPC channel, keepalive, retries, round-robin with
client-side health checking), ``HttpChatClient`` (:mod:`.http`: the same calls over the
OpenAI-compatible HTTP surface), :mod:`.loadtest` (``chatforge loadtest``) and :mod:`.top`
(``chatforge top``, scraping a server's /metrics). Nothing here imports torch or the model
side (``chatforge.inference``, ``chatforge.models``): a client machine needs grpc, not the
models; an import-linter contract in ``pyproject.toml`` holds it.
"""

from chatforge.client.channel import ChatbotClient, ChatbotError, ModelEntry, ReplyChunk

__all__ = ["ChatbotClient", "ChatbotError", "ModelEntry", "ReplyChunk"]
