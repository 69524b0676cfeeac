"""The tether.v1 contract: committed generated code matches a fresh run, and every element is documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto" / "tether" / "v1"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


# Lines that stamp the generator's own version: a patch release of grpcio-tools or protobuf changes them and
# nothing else, so the comparison leaves them out (pyproject pins grpcio-tools so `make proto` reproduces them).
_VERSION_STAMP = re.compile(rb"^(GRPC_GENERATED_VERSION = .*|# Protobuf Python Version: .*|_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\))$", re.M)


def _generated_files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: _VERSION_STAMP.sub(b"<version stamp>", p.read_bytes())
        for p in sorted(directory.iterdir())
        if p.name.endswith(GENERATED)
    }


def test_committed_generated_code_matches_a_fresh_run(tmp_path):
    pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is not installed (pip install -e .[dev])")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "proto" / "gen.sh"), str(tmp_path)], check=True, env=env, cwd=ROOT)
    fresh = _generated_files(tmp_path / "tether" / "v1")
    committed = _generated_files(PROTO_DIR)
    assert fresh, "proto/gen.sh generated nothing"
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `make proto` and commit"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"generated code is stale for {stale}: run `make proto` (proto/gen.sh) and commit"


def _descriptor_set(tmp_path: Path):
    pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is not installed (pip install -e .[dev])")
    from google.protobuf import descriptor_pb2

    out = tmp_path / "set.binpb"
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in PROTO_DIR.glob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", "--include_source_info",
         f"--descriptor_set_out={out}", *protos],
        check=True,
        cwd=ROOT,
    )  # fmt: skip
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_every_service_rpc_message_field_and_enum_value_is_commented(tmp_path):
    undocumented = []
    for file in _descriptor_set(tmp_path).file:
        comments = {
            tuple(loc.path): loc.leading_comments.strip() or loc.trailing_comments.strip()
            for loc in file.source_code_info.location
        }

        def need(path: tuple, name: str, file=file, comments=comments) -> None:
            if not comments.get(path):
                undocumented.append(f"{file.name}: {name}")

        def walk_message(message, path: tuple, prefix: str) -> None:
            need(path, prefix)
            for i, f in enumerate(message.field):
                need((*path, 2, i), f"{prefix}.{f.name}")
            for i, o in enumerate(message.oneof_decl):
                need((*path, 8, i), f"{prefix}.{o.name} (oneof)")
            for i, nested in enumerate(message.nested_type):
                if not nested.options.map_entry:
                    walk_message(nested, (*path, 3, i), f"{prefix}.{nested.name}")

        for i, message in enumerate(file.message_type):
            walk_message(message, (4, i), message.name)
        for i, enum in enumerate(file.enum_type):
            need((5, i), enum.name)
            for j, value in enumerate(enum.value):
                need((5, i, 2, j), value.name)
        for i, service in enumerate(file.service):
            need((6, i), service.name)
            for j, method in enumerate(service.method):
                need((6, i, 2, j), f"{service.name}.{method.name}")
                kind = comments.get((6, i, 2, j), "").split(".")[0]
                expected = {
                    (False, False): "Unary",
                    (False, True): "Server streaming",
                    (True, False): "Client streaming",
                    (True, True): "Bidirectional streaming",
                }[method.client_streaming, method.server_streaming]
                if kind != expected:
                    undocumented.append(
                        f"{service.name}.{method.name}: comment must start with '{expected}.'"
                    )
    assert not undocumented, "undocumented proto elements:\n" + "\n".join(undocumented)


def test_services_have_the_agreed_shape():
    from tether.v1 import jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc

    jobs = jobs_pb2.DESCRIPTOR.services_by_name["JobService"]
    streaming = {m.name: (m.client_streaming, m.server_streaming) for m in jobs.methods}
    assert streaming == {
        "RunJob": (True, True),
        "SubmitJob": (False, False),
        "GetJob": (False, False),
        "WatchJob": (False, True),
        "ReadResult": (False, True),
        "CancelJob": (False, False),
    }
    models = models_pb2.DESCRIPTOR.services_by_name["ModelService"]
    assert [m.name for m in models.methods] == ["ListModels", "GetModel"]
    for service in (jobs, models):
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request"
            assert method.output_type.name == f"{method.name}Response"
    assert hasattr(jobs_pb2_grpc, "JobServiceStub") and hasattr(
        models_pb2_grpc, "add_ModelServiceServicer_to_server"
    )
    states = [v.name for v in jobs_pb2.JobState.DESCRIPTOR.values]
    assert states[0] == "JOB_STATE_UNSPECIFIED" and "JOB_STATE_CANCELLED" in states
