"""A shared server against careless or hostile clients: limits before any work, undecodable bytes, scans.

Driven with the raw stubs of test_server (the wire contract), on one loopback server per module; every wait
is on a stream or a condition with a timeout.
"""

from __future__ import annotations

import grpc
import pytest
import torch
from test_server import QUICK, WAIT, Client, assert_serving, code_of, program, spec

from tether import values
from tether.runtime import tiny
from tether.v1 import jobs_pb2, program_pb2, values_pb2
from tether.wire import varint

SERVER_OPTIONS = {"max_program_bytes": 4096}


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2(), "net": tiny.tiny_net()}


@pytest.fixture
def client(server):
    c = Client(server.address)
    yield c
    c.close()


def _raw(client: Client, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    call = client.channel.unary_unary(f"/tether.v1.{method}")  # no serializers: the bytes go as they are
    return code_of(lambda: call(data, timeout=WAIT))


def _field(message_type, name: str, payload: bytes) -> bytes:
    """The bytes of one length-delimited field of `message_type` (concatenated messages merge)."""
    number = message_type.DESCRIPTOR.fields_by_name[name].number
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _nested_bytes(depth: int) -> bytes:
    """A serialized Value of lists nested `depth` deep (past what protobuf will build or parse)."""
    data = values.to_value(1).SerializeToString()
    for _ in range(depth):
        data = _field(values_pb2.Value, "list_value", _field(values_pb2.ValueList, "items", data))
    return data


def _job_bytes(prog: program_pb2.Program, extra_program_bytes: bytes = b"") -> bytes:
    """A serialized JobSpec of `prog`, with bytes appended to the program's own."""
    return _field(jobs_pb2.JobSpec, "program", prog.SerializeToString() + extra_program_bytes)


def _nested(depth: int) -> values_pb2.Value:
    value = values.to_value(1)
    for _ in range(depth):
        value = values_pb2.Value(list_value=values_pb2.ValueList(items=[value]))
    return value


# ------------------------------------------------------------------------------------- undecodable bytes


@pytest.mark.parametrize("method, message", [
    ("JobService/SubmitJob", "tether.v1.SubmitJobRequest"),
    ("JobService/GetJob", "tether.v1.GetJobRequest"),
    ("ModelService/ListModels", "tether.v1.ListModelsRequest"),
])
def test_garbage_bytes_are_invalid_argument_naming_the_message(client, method, message):
    code, details = _raw(client, method, b"\xff\xff\xff\xff garbage \x00\x01")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
    assert_serving(client)


def test_invalid_utf8_and_nesting_past_protobufs_limit_are_invalid_argument(client):
    bad_utf8 = _job_bytes(program("out = model.lm_head.output.save()\n", "hi")).replace(b"out = model",
                                                                                          b"\xff\xfe = model")
    entry = _field(program_pb2.Program.BindingsEntry, "key", b"x") + _field(program_pb2.Program.BindingsEntry,
                                                                            "value", _nested_bytes(120))
    too_deep = _job_bytes(program("y = x\n", "hi"), _field(program_pb2.Program, "bindings", entry))
    for job in (bad_utf8, too_deep):
        code, details = _raw(client, "JobService/SubmitJob", _field(jobs_pb2.SubmitJobRequest, "job", job))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "tether.v1.SubmitJobRequest" in details, details
        run = client.channel.stream_stream("/tether.v1.JobService/RunJob")
        code, details = code_of(lambda job=job, run=run: run(iter([_field(jobs_pb2.RunJobRequest, "job", job)]), timeout=WAIT))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "tether.v1.RunJobRequest" in details, details
    assert_serving(client)


# ------------------------------------------------------------------------------------ limits before work


def test_oversized_program_is_refused_naming_the_limit(client):
    source = "out = model.lm_head.output.save()\n" + "x = 1\n" * 1000
    for call in (lambda: client.submit(spec(program(source, "hi"))), lambda: client.run(spec(program(source, "hi")))):
        code, details = code_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "Program.source" in details and "4096" in details
    assert_serving(client)


def test_positions_must_be_consistent_with_the_source(client):
    code, details = code_of(lambda: client.submit(spec(program("y = 1\n", "hi", first_line=10**8))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "first_line" in details and "4096" in details, details
    block = program_pb2.LocalBlock(block_id="b", first_line=500, last_line=501)
    code, details = code_of(lambda: client.submit(spec(program("y = 1\n", "hi", local_blocks=[block]))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "local_blocks[0]" in details, details
    assert_serving(client)


def test_value_nesting_and_count_are_bounded(client):
    code, details = code_of(lambda: client.submit(spec(program("y = x\n", "hi", bindings={"x": _nested(40)}))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "nested more than 32" in details, details
    many = values_pb2.Value(list_value=values_pb2.ValueList(items=[values.to_value(1)] * 100_001))
    code, details = code_of(lambda: client.submit(spec(program("y = x\n", "hi", bindings={"x": many}))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "100000" in details, details
    outcome = client.run(spec(program("out = model.lm_head.output.save()\ny = x\n", "hi",
                                      bindings={"x": _nested(30)})))
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    assert_serving(client)


# ------------------------------------------------------------------------------------------------- scan


def test_remote_scan_gives_shapes_and_dtypes_of_saved_tensors(client):
    prog = program("out = model.transformer.h[0].output[0].save()\npair = (model.lm_head.output, 3).save()\n",
                   "hello", kind="trace")
    prog.kind = program_pb2.PROGRAM_KIND_SCAN
    outcome = client.run(spec(prog))
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    saved = outcome.saved()
    assert saved["out"].is_meta and saved["out"].dtype == torch.float32 and saved["out"].shape[-1] == 64
    assert saved["pair"][0].is_meta and saved["pair"][0].shape[-1] == 512 and saved["pair"][1] == 3
    assert_serving(client)


def test_quick_job_after_refusals(client):
    assert client.run(spec(QUICK)).final.state == jobs_pb2.JOB_STATE_COMPLETED
