"""Serving: the engine (no grpc), the thin servicer, interceptors, the grpc.aio server and the client.

Import the submodule you need (``chatforge.serving.engine``, ``.server``, ``.client``):
this package imports nothing itself, so a client does not pull in the server.
"""
