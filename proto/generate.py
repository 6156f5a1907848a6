"""Regenerate the committed protobuf code: python -m exod.proto.generate [OUT_DIR]."""

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
SCHEMAS = ("exod.proto",)
GENERATED = ("exod_pb2.py", "exod_pb2.pyi", "exod_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules into out_dir and return their paths."""
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        # The virtual path makes imports read `exod.proto.exod_pb2`.
        args = [
            "protoc",
            f"-I{include}",
            f"-Iexod/proto={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"exod/proto/{name}" for name in SCHEMAS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copyfile(Path(tmp) / "exod" / "proto" / name, target)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
