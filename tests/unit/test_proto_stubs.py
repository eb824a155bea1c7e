"""The committed gRPC stubs are what `make proto` generates from the committed .proto."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = "tgi_proto/generate/v1/generate.proto"
STUBS = ["generate_pb2.py", "generate_pb2_grpc.py", "generate_pb2.pyi"]


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "proto"), f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", str(ROOT / "proto" / PROTO)],
        check=True,
    )
    for name in STUBS:
        generated = (tmp_path / "tgi_proto/generate/v1" / name).read_text()
        committed = (ROOT / "proto/tgi_proto/generate/v1" / name).read_text()
        assert generated == committed, f"{name} is stale: run `make proto`"
