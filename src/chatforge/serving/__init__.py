"""Serving: the engine (no grpc), the model repository, the thin servicer, interceptors and the grpc.aio server.

Import the submodule you need (``chatforge.serving.engine``, ``.repository``, ``.server``):
this package imports nothing itself. The client side (``ChatbotClient``, loadtest, top) lives
beside it in :mod:`chatforge.client`, so a client never pulls in the server.
"""
