"""Regenerate the Python gRPC code from proto/ with grpc_tools.protoc.

    python tools/gen_proto.py            # writes src/chatforge/v1/chatbot_pb2{,_grpc}.py and .pyi
    python tools/gen_proto.py --out DIR  # writes the same files under DIR (tests compare them)

``-I proto`` makes the generated import lines ``from chatforge.v1 import chatbot_pb2``,
which resolve as-is because the files land in the ``chatforge.v1`` package under src/:
no hand edits of generated code. protoc's output depends only on the .proto files
and the grpcio-tools version, so running this twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "src"


def proto_files() -> list[Path]:
    # Sorted so the protoc invocation (and so its output) never depends on directory order.
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for every .proto under proto/; return the generated files (sorted)."""
    from importlib.resources import files

    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(files("grpc_tools") / "_proto")
    rel = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    if not rel:
        raise FileNotFoundError(f"no .proto files under {PROTO_ROOT}")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *rel,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    generated = []
    for r in rel:
        stem = out_dir / r[: -len(".proto")]
        generated += [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2.pyi"), Path(f"{stem}_pb2_grpc.py")]
    return sorted(generated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: src/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
