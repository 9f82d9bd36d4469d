"""The committed generated code matches the .proto, and the .proto documents every field."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "chatforge" / "v1" / "chatbot.proto"
GENERATED = ROOT / "src" / "chatforge" / "v1"

pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) is needed to regenerate the code")


def _gen_module():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gen_proto
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return gen_proto


def test_generated_code_is_up_to_date_and_deterministic(tmp_path):
    gen_proto = _gen_module()
    files_a = gen_proto.generate(tmp_path / "a")
    files_b = gen_proto.generate(tmp_path / "b")
    names = sorted(p.name for p in files_a)
    assert names == ["chatbot_pb2.py", "chatbot_pb2.pyi", "chatbot_pb2_grpc.py"]
    for a, b in zip(files_a, files_b, strict=True):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two runs"
        committed = GENERATED / a.name
        assert committed.read_bytes() == a.read_bytes(), (
            f"{committed} is stale; run: python tools/gen_proto.py"
        )


def test_generated_imports_resolve_without_edits():
    text = (GENERATED / "chatbot_pb2_grpc.py").read_text()
    assert "from chatforge.v1 import chatbot_pb2" in text
    from chatforge.v1 import chatbot_pb2, chatbot_pb2_grpc

    assert chatbot_pb2.DESCRIPTOR.package == "chatforge.v1"
    assert hasattr(chatbot_pb2_grpc, "ChatbotStub")
    methods = chatbot_pb2.DESCRIPTOR.services_by_name["Chatbot"].methods_by_name
    assert set(methods) == {"Reply", "Classify", "ListModels"}
    assert methods["Reply"].server_streaming and not methods["Reply"].client_streaming


def test_generation_options_use_presence():
    from chatforge.v1 import chatbot_pb2 as pb

    opts = pb.GenerationOptions()
    for name in ("max_new_tokens", "temperature", "top_p", "seed", "do_sample"):
        assert not opts.HasField(name), name
    opts.temperature = 0.0  # an explicit zero must be distinguishable from "unset"
    assert opts.HasField("temperature")


def test_every_field_and_rpc_is_documented():
    lines = PROTO.read_text().splitlines()
    field = re.compile(r"^\s*(optional |repeated )?[\w.<>, ]+ \w+ = \d+;")
    rpc = re.compile(r"^\s*rpc \w+")
    undocumented, checked = [], 0
    for i, line in enumerate(lines):
        if field.match(line) or rpc.match(line):
            checked += 1
            prev = lines[i - 1].strip()
            if not prev.startswith("//"):
                undocumented.append(f"line {i + 1}: {line.strip()}")
    assert checked >= 35, f"the field pattern matched only {checked} lines; fix the test"
    assert not undocumented, "fields without a comment:\n" + "\n".join(undocumented)
