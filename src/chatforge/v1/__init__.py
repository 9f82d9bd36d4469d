"""Generated gRPC code for the chatforge.v1 API (proto/chatforge/v1/*.proto).

Do not edit the ``*_pb2*`` files by hand: run ``python tools/gen_proto.py``.
"""
