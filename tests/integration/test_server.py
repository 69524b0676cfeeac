"""`tether serve` end to end: a real gRPC server on 127.0.0.1 (OS-assigned port) driven with the raw stubs.

The Python client is not used here: programs are built as tether.v1 messages with tether.values, so these
tests pin the wire contract itself. Waits use conditions/streams with timeouts, never sleeps.
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import queue
import textwrap
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tether
from tether import tiny, values, wire
from tether.runtime.language_model import LanguageModel
from tether.runtime.program import Program, execute
from tether.server.app import start_server
from tether.v1 import (
    failure_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    program_pb2,
    values_pb2,
)

WAIT = 30.0  # seconds: the longest any test waits for the server to do something
MIB = 1 << 20
KINDS = {"trace": program_pb2.PROGRAM_KIND_TRACE, "generate": program_pb2.PROGRAM_KIND_GENERATE,
         "session": program_pb2.PROGRAM_KIND_SESSION}
MODEL = values_pb2.Value(model_reference=values_pb2.ModelReference(name="tiny"))
TETHER = values.to_value(tether)
TORCH = values.to_value(torch)


# ---------------------------------------------------------------------------------------------- helpers


def program(source: str, *args: Any, kind: str = "trace", model: str = "tiny", bindings: dict | None = None,
            kwargs: dict | None = None, first_line: int = 10, functions=(), tracer_name: str = "",
            local_blocks=()) -> program_pb2.Program:
    """A Program message for `source` (dedented), binding `model`, `tether` and `torch` by default."""
    return program_pb2.Program(
        kind=KINDS[kind], source=textwrap.dedent(source).lstrip("\n"), filename="user_program.py",
        first_line=first_line, model=model, args=[values.to_value(a) for a in args],
        kwargs={k: values.to_value(v) for k, v in (kwargs or {}).items()},
        bindings={"model": MODEL, "tether": TETHER, "torch": TORCH, **(bindings or {})},
        functions=list(functions), tracer_name=tracer_name, local_blocks=list(local_blocks),
    )


def spec(prog: program_pb2.Program, **fields) -> jobs_pb2.JobSpec:
    return jobs_pb2.JobSpec(program=prog, **fields)


def value_map(chunks: list[jobs_pb2.Chunk]) -> dict[str, Any]:
    data = wire.join_chunks(chunks)
    return values.from_value_map(values_pb2.ValueMap.FromString(data), resolve_reference=values.import_reference)


def packed(mapping: dict[str, Any]) -> bytes:
    return values.to_value_map(mapping).SerializeToString()


@dataclass
class Outcome:
    """Everything a job's event stream said."""

    events: list[jobs_pb2.JobEvent] = field(default_factory=list)

    @property
    def states(self) -> list[int]:
        return [e.status.state for e in self.events if e.WhichOneof("event") == "status"]

    @property
    def final(self) -> jobs_pb2.JobStatus:
        return [e.status for e in self.events if e.WhichOneof("event") == "status"][-1]

    @property
    def logs(self) -> list[str]:
        return [e.log.text for e in self.events if e.WhichOneof("event") == "log"]

    @property
    def result(self) -> jobs_pb2.JobResult:
        chunks = [e.result for e in self.events if e.WhichOneof("event") == "result"]
        return jobs_pb2.JobResult.FromString(wire.join_chunks(chunks))

    def saved(self) -> dict[str, Any]:
        return values.from_value_map(self.result.saved, resolve_reference=values.import_reference)


def events_of(response: jobs_pb2.RunJobResponse | jobs_pb2.WatchJobResponse) -> list[jobs_pb2.JobEvent]:
    """A response's events in order: `event`, then `more_events`."""
    return [response.event, *response.more_events]


class Stream:
    """One RunJob call driven by hand: send later messages with `send`, read events with `next_event`."""

    def __init__(self, stub: jobs_pb2_grpc.JobServiceStub, job: jobs_pb2.JobSpec, metadata=()):
        self._outbox: queue.Queue = queue.Queue()
        self._outbox.put(jobs_pb2.RunJobRequest(job=job))
        self.call = stub.RunJob(self._requests(), metadata=metadata, timeout=WAIT)
        self.outcome = Outcome()
        self._pending: collections.deque[jobs_pb2.JobEvent] = collections.deque()  # received, not yet read

    def _requests(self):
        while (message := self._outbox.get()) is not None:
            yield message

    def send(self, message: jobs_pb2.RunJobRequest) -> None:
        self._outbox.put(message)

    def answer(self, call: jobs_pb2.LocalCall, writes: dict[str, Any]) -> None:
        data = packed(writes)
        for chunk in wire.split_chunks(data):
            self.send(jobs_pb2.RunJobRequest(local_result=jobs_pb2.LocalResult(call_id=call.call_id, values=chunk)))

    def next_event(self) -> jobs_pb2.JobEvent:
        if not self._pending:
            self._pending.extend(events_of(next(self.call)))
        event = self._pending.popleft()
        self.outcome.events.append(event)
        return event

    def until(self, predicate: Callable[[jobs_pb2.JobEvent], bool]) -> jobs_pb2.JobEvent:
        while not predicate(event := self.next_event()):
            pass
        return event

    def finish(self, answer: Callable[[str, dict], dict] | None = None) -> Outcome:
        """Read to the end, answering local() calls with `answer(block_id, reads) -> writes`."""
        calls: dict[str, list[jobs_pb2.LocalCall]] = {}
        try:
            for event in itertools.chain(self._pending, (e for r in self.call for e in events_of(r))):
                self.outcome.events.append(event)
                if event.WhichOneof("event") == "local_call":
                    call = event.local_call
                    parts = calls.setdefault(call.call_id, [])
                    parts.append(call)
                    if sum(len(p.values.data) for p in parts) >= call.values.total_size:
                        self._answer(call, [p.values for p in parts], answer)
        finally:
            self.close()
        return self.outcome

    def _answer(self, call, chunks, answer) -> None:
        try:
            writes = answer(call.block_id, value_map(chunks))
        except Exception as error:
            failure = failure_pb2.Failure(type=f"builtins.{type(error).__name__}", message=str(error),
                                          traceback=f"{type(error).__name__}: {error}\n")
            self.send(jobs_pb2.RunJobRequest(local_result=jobs_pb2.LocalResult(call_id=call.call_id,
                                                                               failure=failure)))
            return
        self.answer(call, writes)

    def close(self) -> None:
        self._outbox.put(None)


class Client:
    """Raw stubs on one channel, with an optional API key."""

    def __init__(self, address: str, api_key: str | None = None):
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 256 * MIB),
                              ("grpc.max_send_message_length", 256 * MIB)])
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.models = models_pb2_grpc.ModelServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def stream(self, job: jobs_pb2.JobSpec) -> Stream:
        return Stream(self.jobs, job, self.metadata)

    def run(self, job: jobs_pb2.JobSpec, answer=None) -> Outcome:
        return self.stream(job).finish(answer)

    def submit(self, job: jobs_pb2.JobSpec) -> jobs_pb2.SubmitJobResponse:
        return self.jobs.SubmitJob(jobs_pb2.SubmitJobRequest(job=job), metadata=self.metadata, timeout=WAIT)

    def watch(self, job_id: str, after: int = 0):
        return self.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, after_sequence=after),
                                  metadata=self.metadata, timeout=WAIT)

    def wait(self, job_id: str, after: int = 0) -> Outcome:
        return Outcome([e for r in self.watch(job_id, after) for e in events_of(r)])

    def get(self, job_id: str) -> jobs_pb2.JobInfo:
        return self.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=self.metadata, timeout=WAIT).job

    def read_result(self, job_id: str, offset: int = 0) -> list[jobs_pb2.Chunk]:
        request = jobs_pb2.ReadResultRequest(job_id=job_id, offset=offset)
        return [r.chunk for r in self.jobs.ReadResult(request, metadata=self.metadata, timeout=WAIT)]

    def cancel(self, job_id: str, reason: str = "test") -> int:
        request = jobs_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        return self.jobs.CancelJob(request, metadata=self.metadata, timeout=WAIT).state

    def close(self) -> None:
        self.channel.close()


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return info.value.code(), info.value.details()


def local_run(source: str, *args: Any, kind: str = "trace", bindings: dict | None = None, **kwargs: Any) -> dict:
    """The same program run in this process on a fresh copy of the tiny model (same seed, same weights)."""
    model, tokenizer = tiny.tiny_gpt2()
    lm = LanguageModel(model, tokenizer=tokenizer)
    prog = Program(kind=kind, source=textwrap.dedent(source).lstrip("\n"), filename="local_program.py",
                   first_line=10, args=args, kwargs=kwargs)
    return execute(lm, prog, {"model": lm, "tether": tether, "torch": torch, **(bindings or {})})


QUICK_SOURCE = "out = model.lm_head.output.save()\n"
QUICK = program(QUICK_SOURCE, "hello")


def assert_serving(client: Client) -> None:
    """The server still runs jobs after whatever the test did."""
    outcome = client.run(spec(QUICK))
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    assert outcome.saved()["out"].shape[-1] == 512


SERVER_OPTIONS = {"local_call_timeout": 20.0}


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2(), "net": tiny.tiny_net()}


# ------------------------------------------------------------------------------------------------ models


def test_list_and_get_models(client):
    listed = client.models.ListModels(models_pb2.ListModelsRequest(), timeout=WAIT).models
    assert [m.name for m in listed] == ["net", "tiny"]
    net, gpt = listed
    assert (gpt.architecture, gpt.data_type, gpt.device, gpt.ready) == (
        "GPT2LMHeadModel", values_pb2.DATA_TYPE_FLOAT32, "cpu", True)
    model, _ = tiny.tiny_gpt2()
    assert gpt.parameter_count == sum(p.numel() for p in model.parameters())
    assert (net.architecture, net.parameter_count) == ("Sequential", 5 * 10 + 10 + 10 * 2 + 2)

    got = client.models.GetModel(models_pb2.GetModelRequest(name="tiny"), timeout=WAIT).spec
    assert got.info.name == "tiny"
    assert [(m.path, m.class_name) for m in got.modules] == [
        (path, type(m).__name__) for path, m in model.named_modules()]
    assert got.printed == repr(model)
    assert '"n_layer": 2' in got.config_json
    assert "tokenizer.json" in got.tokenizer_files
    check = client.health.Check(health_pb2.HealthCheckRequest(service="tether.v1.JobService"), timeout=WAIT)
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_model_and_job(client):
    code, details = code_of(lambda: client.models.GetModel(models_pb2.GetModelRequest(name="nope"), timeout=WAIT))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details and "tiny" in details
    code, details = code_of(lambda: client.submit(spec(program("x = 1\n", "hi", model="nope"))))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    code, _ = code_of(lambda: next(client.stream(spec(program("x = 1\n", "hi", model="nope"))).call))
    assert code == grpc.StatusCode.NOT_FOUND
    for call in (lambda: client.get("no-such-job"), lambda: client.watch("no-such-job"),
                 lambda: client.read_result("no-such-job"), lambda: client.cancel("no-such-job")):
        assert code_of(call)[0] == grpc.StatusCode.NOT_FOUND
    assert_serving(client)


# -------------------------------------------------------------------------------------------- RunJob


TRACE = """
h = model.transformer.h[0].mlp.output.save()
hidden = model.transformer.h[1].output
logits = model.lm_head.output.save()
n = 3
"""


def test_run_job_trace_matches_local_run(client):
    outcome = client.run(spec(program(TRACE, "The Eiffel Tower is in the city of")))
    assert outcome.states == [jobs_pb2.JOB_STATE_RECEIVED, jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_DISPATCHED,
                              jobs_pb2.JOB_STATE_RUNNING, jobs_pb2.JOB_STATE_COMPLETED]
    assert [e.sequence for e in outcome.events] == list(range(1, len(outcome.events) + 1))
    assert len({e.job_id for e in outcome.events}) == 1
    remote = outcome.saved()
    local = local_run(TRACE, "The Eiffel Tower is in the city of")
    for name in ("h", "logits"):
        assert remote[name].dtype == local[name].dtype and remote[name].shape == local[name].shape
        assert torch.equal(remote[name], local[name].as_subclass(torch.Tensor)), name
    assert remote["n"] == 3
    assert list(outcome.result.unsaved) == ["hidden"]  # an activation that was not saved: a stand-in


def test_generate_and_plain_module(client):
    source = """
    tracer.all()
    step = model.lm_head.output[:, -1].argmax(-1)
    steps.append(step)
    """
    body = "steps = tether.list().save()\n" + textwrap.dedent(source)
    prog = program(body, "hello", kind="generate", kwargs={"max_new_tokens": 4}, tracer_name="tracer")
    remote = client.run(spec(prog)).saved()["steps"]
    assert len(remote) == 4 and all(s.shape == (1,) for s in remote)

    net = program("""
    hidden = model.layer1.output.save()
    model.layer2.output = model.layer2.output * 0
    out = model.output.save()
    """, torch.ones(3, 5), model="net", bindings={"model": values_pb2.Value(
        model_reference=values_pb2.ModelReference(name="net"))})
    saved = client.run(spec(net)).saved()
    expected = tiny.tiny_net().layer1(torch.ones(3, 5))
    assert torch.equal(saved["hidden"], expected) and torch.equal(saved["out"], torch.zeros(3, 2))


def test_log_events_in_order(client):
    outcome = client.run(spec(program("""
    print("first", 1, sep="-")
    print("no newline yet", end="")
    print(" ... done")
    for i in range(3):
        print("line", i)
    out = model.lm_head.output
    """, "hi")))
    assert outcome.logs == ["first-1", "no newline yet ... done", "line 0", "line 1", "line 2"]
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED


def test_submodule_reference_and_shipped_function(client):
    function = program_pb2.FunctionSource(
        name="double", filename="helpers.py", first_line=3,
        source="def double(x):\n    print('doubling')\n    return x * 2\n")
    layer = values_pb2.Value(model_reference=values_pb2.ModelReference(name="tiny", path="transformer.h.0.mlp"))
    prog = program("twice = double(layer.output).save()\nonce = layer.output.save()\n", "hello",
                   bindings={"layer": layer}, functions=[function])
    outcome = client.run(spec(prog))
    saved = outcome.saved()
    assert torch.equal(saved["twice"], saved["once"] * 2)
    assert outcome.logs == ["doubling"]


def test_program_error_maps_traceback_to_user_lines(client):
    outcome = client.run(spec(program("""
    h = model.transformer.h[0].output
    x = 1
    y = [1, 2][x + 5]
    """, "hi", first_line=20)))
    status = outcome.final
    assert status.state == jobs_pb2.JOB_STATE_ERROR
    failure = status.failure
    assert failure.type == "builtins.IndexError" and "out of range" in failure.message
    assert [(f.filename, f.line, f.source_line) for f in failure.frames] == [
        ("user_program.py", 22, "y = [1, 2][x + 5]")]
    assert 'File "user_program.py", line 22' in failure.traceback and "user_program.py [" not in failure.traceback
    assert_serving(client)


# ------------------------------------------------------------------------------------------ local()


LOCAL = """
h = model.transformer.h[0].mlp.output
with tether.local():
    scale = h.detach().abs().mean().item() + 1.0
    print("on the client")
model.transformer.h[0].mlp.output = h * scale
logits = model.lm_head.output.save()
"""


def test_local_round_trip_changes_output_like_a_local_run(client):
    seen = []

    def answer(block_id, reads):
        seen.append((block_id, sorted(reads)))
        return {"scale": reads["h"].detach().abs().mean().item() + 1.0}

    block = program_pb2.LocalBlock(block_id="blk-1", first_line=12, last_line=13, reads=["h"], writes=["scale"])
    outcome = client.run(spec(program(LOCAL, "hello world", local_blocks=[block])), answer)
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    assert seen == [("blk-1", ["h"])]  # the client's block id; only data the block reads travels
    local = local_run(LOCAL, "hello world")
    assert torch.equal(outcome.saved()["logits"], local["logits"].as_subclass(torch.Tensor))
    assert list(outcome.result.unsaved) == ["h"]  # `scale` is a plain float: it is handed back as is
    assert outcome.saved()["scale"] == pytest.approx(float(local["scale"]))


def test_local_block_every_generation_step_in_order(client):
    source = """
    tracer.all()
    token = model.lm_head.output[0, -1].argmax()
    with tracer.local():
        print(int(token))
    """
    prog = program(source, "hello", kind="generate", kwargs={"max_new_tokens": 8}, tracer_name="tracer")
    calls = []
    outcome = client.run(spec(prog), lambda block_id, reads: calls.append(int(reads["token"])) or {})
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    assert len(calls) == 8 and [e.local_call.block_id for e in outcome.events
                                if e.WhichOneof("event") == "local_call"] == ["13"] * 8  # str(first body line)


def test_local_block_failure_fails_the_job_with_the_client_cause(client):
    outcome = client.run(spec(program(LOCAL, "hi")), lambda block_id, reads: 1 / 0)
    failure = outcome.final.failure
    assert outcome.final.state == jobs_pb2.JOB_STATE_ERROR
    assert "local() block" in failure.message and failure.cause.type == "builtins.ZeroDivisionError"
    assert [f.line for f in failure.frames] == [11]  # the user's `with tether.local():` line
    assert_serving(client)


def test_client_only_function(client):
    client_only = values_pb2.Value(reference=values_pb2.Reference(module="__client__", qualname="plot"))
    bad = program("h = model.lm_head.output\nplot(h)\n", "hi", bindings={"plot": client_only})
    code, details = code_of(lambda: client.submit(spec(bad)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "line 11" in details and "plot" in details and "with tether.local():" in details
    good = program("h = model.lm_head.output.save()\nwith tether.local():\n    plot(h)\n", "hi",
                   bindings={"plot": client_only})
    outcome = client.run(spec(good), lambda block_id, reads: {})
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED


def test_local_answers_the_server_refuses_stay_client_side(client):
    source = LOCAL.replace('print("on the client")', "helper = os")
    outcome = client.run(spec(program(source, "hi")), lambda block_id, reads: {"scale": 2.0, "helper": os})
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    assert "helper" not in outcome.result.saved and outcome.saved()["scale"] == 2.0


def test_submit_rejects_local_blocks(client):
    code, details = code_of(lambda: client.submit(spec(program(LOCAL, "hi"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "RunJob" in details


def test_disconnect_during_local_call_fails_job_and_frees_worker(client):
    stream = client.stream(spec(program(LOCAL, "hi")))
    job_id = stream.until(lambda e: e.WhichOneof("event") == "local_call").job_id
    stream.call.cancel()  # the client goes away while the server waits for its answer
    stream.close()
    outcome = client.wait(job_id)
    assert outcome.final.state == jobs_pb2.JOB_STATE_ERROR
    assert "disconnected" in outcome.final.failure.message
    assert_serving(client)


def test_unanswered_local_call_times_out(client):
    stream = client.stream(spec(program(LOCAL, "hi"), local_call_timeout={"nanos": 300_000_000}))
    job_id = stream.until(lambda e: e.WhichOneof("event") == "local_call").job_id
    outcome = client.wait(job_id)  # the stream stays open; nobody answers
    stream.close()
    assert outcome.final.state == jobs_pb2.JOB_STATE_ERROR
    assert "did not answer" in outcome.final.failure.message
    assert code_of(lambda: client.read_result(job_id))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_serving(client)


def test_two_clients_with_local_blocks_do_not_see_each_other(server):
    clients = [Client(server.address) for _ in range(2)]
    results: dict[int, dict] = {}

    def run(i: int) -> None:
        def answer(block_id, reads):
            return {"scale": float(i + 2)}

        results[i] = clients[i].run(spec(program(LOCAL, f"prompt number {i}")), answer).saved()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert [results[i]["scale"] for i in range(2)] == [2.0, 3.0]
    for c in clients:
        c.close()


def test_run_job_retry_with_the_same_request_id_attaches_to_the_same_job(client):
    job = spec(program(LOCAL, "hi"), request_id=str(uuid.uuid4()))
    first = client.stream(job)
    call = first.until(lambda e: e.WhichOneof("event") == "local_call")
    first.call.cancel()  # the stream breaks while the server waits for the answer: the job fails at once
    first.close()
    assert client.wait(call.job_id).final.state == jobs_pb2.JOB_STATE_ERROR
    retry = client.stream(job).finish()  # the client retries: no second job, the first one replayed
    assert {e.job_id for e in retry.events} == {call.job_id}
    assert [e.sequence for e in retry.events] == list(range(1, len(retry.events) + 1))
    assert retry.final.state == jobs_pb2.JOB_STATE_ERROR and "disconnected" in retry.final.failure.message


def test_large_values_down_and_up_through_local(client):
    source = """
    g = torch.Generator().manual_seed(1)
    big = torch.randn(4 * 1024 * 1024, generator=g) + model.lm_head.output[0, 0, 0]
    with tether.local():
        back = big * 2
    total = (back.sum()).save()
    """
    outcome = client.run(spec(program(source, "hi")), lambda block_id, reads: {"back": reads["big"] * 2})
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    calls = [e.local_call for e in outcome.events if e.WhichOneof("event") == "local_call"]
    assert len(calls) >= 16 and all(len(c.values.data) <= MIB for c in calls)
    local = local_run(source, "hi")
    assert torch.equal(outcome.saved()["total"], local["total"].as_subclass(torch.Tensor))


# --------------------------------------------------------------------- non-blocking: submit, watch, result


BIG = """
g = torch.Generator().manual_seed(0)
big = torch.randn(1_500_000, generator=g).save()
"""


def test_submit_watch_reattach_and_chunked_result(client):
    blocker = client.stream(spec(program(LOCAL, "hold the worker")))
    blocker.until(lambda e: e.WhichOneof("event") == "local_call")  # the model's only worker now waits

    request_id = str(uuid.uuid4())
    submitted = client.submit(spec(program(BIG, "hi"), request_id=request_id))
    assert not submitted.existing and submitted.state == jobs_pb2.JOB_STATE_QUEUED
    again = client.submit(spec(program(BIG, "hi"), request_id=request_id))
    assert (again.job_id, again.existing) == (submitted.job_id, True)  # retries are idempotent

    first = client.watch(submitted.job_id)
    seen = events_of(next(first))  # RECEIVED, QUEUED (ready together: one message): the job has not run yet
    assert [e.status.state for e in seen] == [jobs_pb2.JOB_STATE_RECEIVED, jobs_pb2.JOB_STATE_QUEUED]
    first.cancel()  # the client drops its stream mid-job
    assert client.get(submitted.job_id).status.state == jobs_pb2.JOB_STATE_QUEUED

    blocker.answer(blocker.outcome.events[-1].local_call, {"scale": 1.0})
    blocker.finish()
    rest = client.wait(submitted.job_id, after=seen[-1].sequence)
    events = seen + rest.events
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))  # no gap, no duplicate
    assert Outcome(events).final.state == jobs_pb2.JOB_STATE_COMPLETED

    info = client.get(submitted.job_id)
    assert info.result_size > 4 * MIB and info.HasField("result_expire_time")
    chunks = client.read_result(submitted.job_id)
    assert len(chunks) > 4 and all(len(c.data) <= MIB for c in chunks)
    result = jobs_pb2.JobResult.FromString(wire.join_chunks(chunks))
    assert torch.equal(values.from_value(result.saved["big"]), local_run(BIG, "hi")["big"].as_subclass(torch.Tensor))
    tail = client.read_result(submitted.job_id, offset=info.result_size - 10)  # resume a broken download
    assert tail[0].offset == info.result_size - 10 and wire.join_chunks(chunks)[-10:] == tail[0].data



def _submit_waiting(client: Client, job: jobs_pb2.JobSpec, seconds: float) -> jobs_pb2.SubmitJobResponse:
    request = jobs_pb2.SubmitJobRequest(job=job)
    request.wait.FromNanoseconds(int(seconds * 1e9))
    return client.jobs.SubmitJob(request, metadata=client.metadata, timeout=WAIT)


def test_submit_with_wait_answers_with_the_ended_jobs_events(client):
    """A waited-for job's events come in the SubmitJob answer, the same as RunJob streams them."""
    prompt = "The Eiffel Tower is in the city of"
    streamed = client.run(spec(program(TRACE, prompt)))
    answer = _submit_waiting(client, spec(program(TRACE, prompt)), WAIT)
    outcome = Outcome([e for r in answer.events for e in events_of(r)])
    assert answer.state == jobs_pb2.JOB_STATE_COMPLETED
    assert outcome.states == streamed.states and outcome.logs == streamed.logs
    assert [e.sequence for e in outcome.events] == list(range(1, len(outcome.events) + 1))
    assert {e.job_id for e in outcome.events} == {answer.job_id}
    for name in ("h", "logits"):
        assert torch.equal(outcome.saved()[name], streamed.saved()[name]), name
    assert not client.submit(spec(program(TRACE, prompt))).events  # without a wait: the id at once, no events


def test_submit_with_wait_leaves_a_running_job_and_a_large_result_to_watch_and_read(client):
    blocker = client.stream(spec(program(LOCAL, "hold the worker")))
    blocker.until(lambda e: e.WhichOneof("event") == "local_call")  # the model's only worker now waits
    waiting = _submit_waiting(client, spec(program(QUICK_SOURCE, "hi")), 0.05)
    assert waiting.state == jobs_pb2.JOB_STATE_QUEUED and not waiting.events  # the wait ended first
    blocker.answer(blocker.outcome.events[-1].local_call, {"scale": 1.0})
    blocker.finish()
    assert client.wait(waiting.job_id).final.state == jobs_pb2.JOB_STATE_COMPLETED

    big = _submit_waiting(client, spec(program(BIG, "hi")), WAIT)  # > 1 MiB of events: not in the answer
    assert big.state == jobs_pb2.JOB_STATE_COMPLETED and not big.events
    result = jobs_pb2.JobResult.FromString(wire.join_chunks(client.read_result(big.job_id)))
    assert torch.equal(values.from_value(result.saved["big"]), local_run(BIG, "hi")["big"].as_subclass(torch.Tensor))

def test_cancel_stops_a_long_generation(client):
    source = """
    tracer.all()
    h = model.transformer.h[0].output
    print("step")
    """
    prog = program(source, "hello", kind="generate", tracer_name="tracer",
                   kwargs={"max_new_tokens": 900, "min_new_tokens": 900})
    job_id = client.submit(spec(prog)).job_id
    watch = (e for r in client.watch(job_id) for e in events_of(r))
    while next(watch).WhichOneof("event") != "log":
        pass  # running: it has printed its first step
    assert client.cancel(job_id, "enough") == jobs_pb2.JOB_STATE_CANCELLED
    outcome = Outcome(list(watch))
    assert outcome.final.state == jobs_pb2.JOB_STATE_CANCELLED and "enough" in outcome.final.message
    assert len(outcome.logs) < 899  # it stopped long before the end
    code, _ = code_of(lambda: client.read_result(job_id))
    assert code == grpc.StatusCode.CANCELLED
    assert client.cancel(job_id) == jobs_pb2.JOB_STATE_CANCELLED  # cancelling again changes nothing
    assert_serving(client)


def test_cancel_on_the_run_job_stream_while_waiting_for_local(client):
    stream = client.stream(spec(program(LOCAL, "hi")))
    stream.until(lambda e: e.WhichOneof("event") == "local_call")
    stream.send(jobs_pb2.RunJobRequest(cancel=jobs_pb2.CancelRequest(reason="changed my mind")))
    outcome = stream.finish()
    assert outcome.final.state == jobs_pb2.JOB_STATE_CANCELLED and "changed my mind" in outcome.final.message


def test_job_time_limit(client):
    prog = program("tracer.all()\nh = model.transformer.h[0].output\n", "hello", kind="generate",
                   tracer_name="tracer", kwargs={"max_new_tokens": 900, "min_new_tokens": 900})
    job_id = client.submit(spec(prog, timeout={"nanos": 200_000_000})).job_id
    outcome = client.wait(job_id)
    assert outcome.final.state == jobs_pb2.JOB_STATE_ERROR and "time limit" in outcome.final.failure.message
    assert code_of(lambda: client.read_result(job_id))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_serving(client)


def test_result_too_large(client):
    job_id = client.submit(spec(program(BIG, "hi"), max_result_bytes=MIB)).job_id
    outcome = client.wait(job_id)
    assert outcome.final.state == jobs_pb2.JOB_STATE_ERROR and "big" in outcome.final.failure.message
    assert code_of(lambda: client.read_result(job_id))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


# ------------------------------------------------------------------------------------- rejected programs


@pytest.mark.parametrize("source, words", [
    ("import os\nos.system('true')\n", ["os", "line 10"]),
    ("h = model.lm_head.output\nf = open('/etc/passwd')\n", ["open", "line 11"]),
    ("h = model.lm_head.output\nc = h.__class__\n", ["__class__", "line 11"]),
])
def test_rejected_programs(client, source, words):
    for call in (lambda: client.submit(spec(program(source, "hi"))),
                 lambda: client.run(spec(program(source, "hi")))):
        code, details = code_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert all(w in details for w in words) and "local()" in details, details
    assert_serving(client)


def test_malicious_pickle_is_refused_and_nothing_runs(client, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = values_pb2.Value(pickled=values_pb2.Pickled(data=pickle.dumps(Evil()), type_name="Evil"))
    prog = program("h = model.lm_head.output\ny = x\n", "hi", bindings={"x": evil})
    for call in (lambda: client.submit(spec(prog)), lambda: client.run(spec(prog))):
        code, details = code_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "posix.system" in details and "`x`" in details
    assert not marker.exists()
    assert_serving(client)


# ----------------------------------------------------------------------------------- limits and keys


def test_queue_full():
    handle = start_server({"tiny": tiny.tiny_gpt2()}, queue_size=1)
    client = Client(handle.address)
    try:
        blocker = client.stream(spec(program(LOCAL, "hold the worker")))
        call = blocker.until(lambda e: e.WhichOneof("event") == "local_call").local_call
        queued = client.submit(spec(QUICK))  # fills the queue of one
        code, details = code_of(lambda: client.submit(spec(QUICK)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in details
        info = client.models.ListModels(models_pb2.ListModelsRequest(), timeout=WAIT).models[0]
        assert info.queue_depth == 1
        blocker.answer(call, {"scale": 1.0})
        assert blocker.finish().final.state == jobs_pb2.JOB_STATE_COMPLETED
        assert client.wait(queued.job_id).final.state == jobs_pb2.JOB_STATE_COMPLETED
        assert_serving(client)
    finally:
        client.close()
        handle.stop(grace=0)


def test_api_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# tether keys\nkey-alice-123456\nkey-bob-7890123\n")
    handle = start_server({"tiny": tiny.tiny_gpt2()}, api_keys=str(keys))
    alice, bob = Client(handle.address, "key-alice-123456"), Client(handle.address, "key-bob-7890123")
    anonymous, wrong = Client(handle.address), Client(handle.address, "not-a-key-at-all")
    try:
        for c, words in ((anonymous, ["requires an API key", "TETHER_API_KEY"]), (wrong, ["...-all", "not one"])):
            code, details = code_of(lambda c=c: c.models.ListModels(models_pb2.ListModelsRequest(),
                                                                    metadata=c.metadata, timeout=WAIT))
            assert code == grpc.StatusCode.UNAUTHENTICATED and all(w in details for w in words), details
            assert code_of(lambda c=c: c.run(spec(QUICK)))[0] == grpc.StatusCode.UNAUTHENTICATED
        job_id = alice.submit(spec(QUICK)).job_id
        assert alice.wait(job_id).final.state == jobs_pb2.JOB_STATE_COMPLETED
        assert code_of(lambda: bob.get(job_id))[0] == grpc.StatusCode.NOT_FOUND  # jobs belong to their key
        assert_serving(bob)
    finally:
        for c in (alice, bob, anonymous, wrong):
            c.close()
        handle.stop(grace=0)


def test_a_job_stuck_in_pure_python_is_stopped_at_its_time_limit(client):
    """`while True` has no module boundary to stop at: past its time limit (and a grace second) the
    watchdog interrupts it, `except Exception` cannot keep it alive, and the worker takes the next job."""
    source = """
    h = model.transformer.h[0].output.save()
    while True:
        try:
            h = h + 0
        except Exception:
            pass
    """
    job_id = client.submit(spec(program(source, "hello"), timeout={"nanos": 200_000_000})).job_id
    outcome = client.wait(job_id)
    assert outcome.final.state == jobs_pb2.JOB_STATE_ERROR and "time limit" in outcome.final.failure.message
    assert code_of(lambda: client.read_result(job_id))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_serving(client)


def test_cancel_stops_a_job_stuck_in_pure_python(client):
    source = """
    print("looping")
    while True:
        pass
    """
    job_id = client.submit(spec(program(source, "hello"))).job_id
    watch = (e for r in client.watch(job_id) for e in events_of(r))
    while next(watch).WhichOneof("event") != "log":
        pass  # it runs the loop now
    client.cancel(job_id, "stuck")
    outcome = Outcome(list(watch))
    assert outcome.final.state == jobs_pb2.JOB_STATE_CANCELLED and "stuck" in outcome.final.message
    assert_serving(client)
