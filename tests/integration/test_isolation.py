"""A shared server against careless or hostile clients: limits before any work, undecodable bytes, scans.

Driven with the raw stubs of test_server (the wire contract), on one loopback server per module; every wait
is on a stream or a condition with a timeout.
"""

from __future__ import annotations

import collections
import os
import signal

import crashers
import grpc
import pytest
import torch
from test_server import QUICK, WAIT, Client, Outcome, assert_serving, code_of, events_of, program, spec

from tether import tiny, values, wire
from tether.framing import varint
from tether.v1 import jobs_pb2, program_pb2, values_pb2

# max_batch 1: each job here runs alone, so a job queued behind a crash runs on the restarted worker (a batch
# shares its worker: see test_server_batching_workers)
SERVER_OPTIONS = {"max_program_bytes": 4096, "job_memory": 200 << 20, "max_batch": 1}
MODEL_NET = values_pb2.Value(model_reference=values_pb2.ModelReference(name="net"))
MODEL_CRASHER = values_pb2.Value(model_reference=values_pb2.ModelReference(name="crasher"))


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2(), "net": tiny.tiny_net(), "crasher": crashers.crasher()}


def _raw(client: Client, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    path = method if method.startswith("/") else f"/tether.v1.{method}"
    call = client.channel.unary_unary(path)  # no serializers: the bytes go as they are
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
    ("AdminService/ListJobs", "tether.v1.ListJobsRequest"),
    ("AdminService/DeployModel", "tether.v1.DeployModelRequest"),
    ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
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


def test_model_edits_are_bounded_like_the_body(client):
    def with_edit(**fields) -> jobs_pb2.JobSpec:
        prog = program("out = model.lm_head.output.save()\n", "hi")
        prog.edits.append(program_pb2.Edit(filename="edits.py", **fields))
        return spec(prog)

    cases = [
        (with_edit(source="x = 1\n" * 1000), ["Edit.source", "4096"]),
        (with_edit(source="x = 1\n", first_line=10**8), ["Program.edits[0].first_line", "4096"]),
        (with_edit(source="y = x\n", bindings={"x": _nested(40)}), ["nested more than 32"]),
    ]
    for job, named in cases:
        code, details = code_of(lambda job=job: client.submit(job))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and all(n in details for n in named), details
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


def test_remote_scan_of_values_holding_tensors_gives_their_shapes(client):
    prog = program("import collections\nh = model.transformer.h[0].output[0]\nbest = torch.max(h, -1).save()\n"
                   "named = collections.OrderedDict(h=h, n=1).save()\nboth = [h, {'h': h}].save()\n", "hello")
    prog.kind = program_pb2.PROGRAM_KIND_SCAN
    outcome = client.run(spec(prog))
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    saved = outcome.saved()
    assert type(saved["best"]).__name__ == "max" and all(t.is_meta for t in saved["best"])
    assert saved["best"].values.shape == saved["best"].indices.shape and saved["best"].indices.dtype == torch.int64
    assert isinstance(saved["named"], collections.OrderedDict) and saved["named"]["h"].is_meta
    assert saved["named"]["h"].shape[-1] == 64 and saved["named"]["n"] == 1
    assert saved["both"][0].is_meta and saved["both"][1]["h"].shape == saved["both"][0].shape
    assert_serving(client)


def test_quick_job_after_refusals(client):
    assert client.run(spec(QUICK)).final.state == jobs_pb2.JOB_STATE_COMPLETED


# --------------------------------------------------------------------------------------- worker isolation


def _worker(server, model: str):
    return server.hub.queues[model].replicas[0]


def _pid(server, model: str) -> int:
    """The pid of the model's worker, once it is ready (a restarted one takes a moment)."""
    return _worker(server, model).worker_pid(timeout=WAIT)


def _net_serves(client: Client) -> None:
    prog = program("out = model.layer2.output.save()\n", torch.ones(1, 5), model="net", bindings={"model": MODEL_NET})
    outcome = client.run(spec(prog))
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final


def _watch_until_log(client: Client, job_id: str):
    """The job's events, read until its first log line (so it is running its program)."""
    watch = (e for r in client.watch(job_id) for e in events_of(r))
    while next(watch).WhichOneof("event") != "log":
        pass
    return watch


def test_a_worker_killed_mid_job_fails_the_job_and_restarts(server, client):
    _net_serves(client)
    net_pid, pid = _pid(server, "net"), _pid(server, "tiny")
    source = """
    print("started")
    while True:
        pass
    """
    job_id = client.submit(spec(program(source, "hello"))).job_id
    queued = client.submit(spec(QUICK)).job_id  # waits behind it, and runs on the restarted worker
    watch = _watch_until_log(client, job_id)
    os.kill(pid, signal.SIGKILL)
    final = Outcome(list(watch)).final
    assert final.state == jobs_pb2.JOB_STATE_ERROR, final
    for words in ("worker process", "crashed", "SIGKILL", "running the program", "'started'"):
        assert words in final.failure.message, final.failure.message
    assert code_of(lambda: client.read_result(job_id))[0] == grpc.StatusCode.ABORTED
    assert client.wait(queued).final.state == jobs_pb2.JOB_STATE_COMPLETED
    assert _pid(server, "tiny") != pid and _pid(server, "net") == net_pid  # the other model never noticed
    _net_serves(client)


@pytest.mark.parametrize("how, signal_name", [(crashers.ABORT, "SIGABRT"), (crashers.SEGFAULT, "SIGSEGV")])
def test_a_forward_that_crashes_the_process_fails_only_its_job(server, client, how, signal_name):
    net_pid = _pid(server, "net")
    x = torch.zeros(1, 4)
    crash = program("out = model.output.save()\n", torch.full((1, 4), how), model="crasher",
                    bindings={"model": MODEL_CRASHER})
    fine = program("out = model.output.save()\n", x, model="crasher", bindings={"model": MODEL_CRASHER})
    crashed, after = client.submit(spec(crash)).job_id, client.submit(spec(fine)).job_id
    final = client.wait(crashed).final
    assert final.state == jobs_pb2.JOB_STATE_ERROR and signal_name in final.failure.message, final
    outcome = client.wait(after)
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    chunks = client.read_result(after)
    saved = values.from_value_map(jobs_pb2.JobResult.FromString(wire.join_chunks(chunks)).saved)
    assert torch.equal(saved["out"], crashers.crasher()(x))  # the same weights after the restart
    assert _pid(server, "net") == net_pid
    assert_serving(client)


SWALLOWED = """
print("looping")
while True:
    try:
        while True:
            pass
    except BaseException:
        pass
"""


def test_a_loop_that_swallows_interrupts_is_killed_after_its_time_limit(server, client):
    pid = _pid(server, "tiny")
    job_id = client.submit(spec(program(SWALLOWED, "hello"), timeout={"nanos": 200_000_000})).job_id
    final = client.wait(job_id).final
    assert final.state == jobs_pb2.JOB_STATE_ERROR and "time limit" in final.failure.message, final
    assert "did not stop" in final.failure.message and _pid(server, "tiny") != pid
    assert code_of(lambda: client.read_result(job_id))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_serving(client)


def test_a_cancel_that_is_swallowed_kills_the_worker(server, client):
    pid = _pid(server, "tiny")
    job_id = client.submit(spec(program(SWALLOWED, "hello"))).job_id
    watch = _watch_until_log(client, job_id)
    client.cancel(job_id, "stop it")
    final = Outcome(list(watch)).final
    assert final.state == jobs_pb2.JOB_STATE_CANCELLED and "stop it" in final.message, final
    assert _pid(server, "tiny") != pid
    assert_serving(client)


def test_a_job_over_the_memory_limit_is_stopped_and_the_worker_restarts(server, client):
    pid = _pid(server, "tiny")
    source = """
    big = torch.ones(64, 1024, 1024)
    print("allocated")
    while True:
        big = big + 0
    """
    job_id = client.submit(spec(program(source, "hello"))).job_id
    final = client.wait(job_id).final
    assert final.state == jobs_pb2.JOB_STATE_ERROR and "--job-memory" in final.failure.message, final
    assert "200 MiB" in final.failure.message
    assert code_of(lambda: client.read_result(job_id))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _pid(server, "tiny") != pid  # a fresh worker: back to its baseline
    assert_serving(client)
