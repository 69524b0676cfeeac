"""The server's parts without a network: local() cutting, job lifecycle, auth, logs, failures, results, batches."""

from __future__ import annotations

import collections
import gc
import multiprocessing
import pickle
import threading
import time
import weakref
from types import SimpleNamespace

import grpc
import pytest
import torch

from tether import LanguageModel
from tether.runtime.job_compat import batch_tokens
from tether.runtime.program import Program
from tether.runtime.saving import NotReached, UnsavedValue
from tether.server import program_texts
from tether.server.auth import Authenticator, is_loopback, read_keys
from tether.server.batching import BatchPolicy, Company, Tokens, batch_info, gather
from tether.server.errors import InvalidProgram, NotFound, ResultTooLarge, Unauthenticated
from tether.server.failures import failure_of
from tether.server.jobs import Job, JobStore
from tether.server.policy import DEFAULT_POLICY
from tether.server.result_bytes import ResultBytes
from tether.server.results import encode_result
from tether.server.worker_main import JobLog
from tether.server.workers import JobLimits, Limits
from tether.v1 import jobs_pb2, values_pb2
from tether.values import from_value, to_value
from tether.wire import join_chunks

# ------------------------------------------------------------------------------------------- local() cuts


def test_local_bodies_are_cut_keeping_lines_and_assigned_names():
    source = (
        "h = model.layer1.output\n"  # line 10
        "with tether.local():\n"
        "    import os\n"
        "    y, z = os.getcwd(), h.sum()\n"
        "out = model.layer2.output.save()\n"
        "with tracer.local(): w = open('/etc/passwd')\n"  # one-line form
    )
    cut, sites = program_texts._cut_local_blocks(source, "user.py", 10, {12: "first"})
    assert cut.splitlines() == [
        "h = model.layer1.output",
        "with tether.local():",
        "    os = y = z = None",  # never runs: it keeps these among the names the body assigns
        "",
        "out = model.layer2.output.save()",
        "with tracer.local(): pass",
    ]
    assert {line: (s.block_id, s.reads) for line, s in sites.items()} == {
        12: ("first", ("h", "os")),
        15: ("15", ("open",)),
    }
    program_texts._check(DEFAULT_POLICY, cut, "user.py", 10, {})  # nothing left for the policy to refuse


def test_a_fake_local_context_cannot_smuggle_code():
    source = (
        "class Sneaky:\n"
        "    local = print\n"
        "with Sneaky.local():\n"
        "    import os\n"
        "    os.system('echo pwned')\n"
    )
    cut, _ = program_texts._cut_local_blocks(source, "user.py", 1, {})
    assert "system" not in cut  # whatever Sneaky.local is, the body is gone from what the server runs


def test_nested_and_function_local_blocks():
    source = "def f(x):\n    with tether.local():\n        with tether.local():\n            y = x\n    return y\n"
    cut, sites = program_texts._cut_local_blocks(source, "helpers.py", 5, {})
    assert list(sites) == [7] and cut.splitlines()[2:4] == ["        y = None", ""]


def test_client_only_functions_are_refused_outside_local_blocks():
    client_only = {"plot": values_pb2.Value(reference=values_pb2.Reference(module="__client__", qualname="plot"))}
    with pytest.raises(InvalidProgram, match=r"user.py, line 3: `plot` is a client-only function"):
        program_texts._check(DEFAULT_POLICY, "h = 1\nplot(h)\n", "user.py", 2, client_only)
    cut, _ = program_texts._cut_local_blocks("h = 1\nwith tether.local():\n    plot(h)\n", "user.py", 2, {})
    program_texts._check(DEFAULT_POLICY, cut, "user.py", 2, client_only)


def test_syntax_errors_name_the_users_line():
    with pytest.raises(InvalidProgram, match=r"user.py, line 8: cannot parse"):
        program_texts._cut_local_blocks("x = 1\ny = (\n", "user.py", 7, {})


# ------------------------------------------------------------------------------------------------- jobs


def _statuses(job: Job) -> list[int]:
    events, _ = job.wait_events(0, lambda: True)
    return [e.status.state for e in events if e.WhichOneof("event") == "status"]


def test_job_lifecycle_sequences_and_result_chunks():
    job = Job("owner", "tiny", 1)
    for state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_DISPATCHED, jobs_pb2.JOB_STATE_RUNNING):
        assert job.set_state(state)
    assert not job.set_state(jobs_pb2.JOB_STATE_QUEUED)  # never backwards
    job.event(log=jobs_pb2.LogLine(text="hi"))
    job.complete(b"x" * 25, chunk_size=10, ttl=60)
    assert not job.set_state(jobs_pb2.JOB_STATE_ERROR)  # terminal is final
    events, finished = job.wait_events(0, lambda: False)
    assert finished and [e.sequence for e in events] == list(range(1, 10))
    assert _statuses(job) == [1, 2, 3, 4, 5]
    chunks = [e.result for e in events if e.WhichOneof("event") == "result"]
    assert [len(c.data) for c in chunks] == [10, 10, 5] and join_chunks(chunks) == b"x" * 25
    later, finished = job.wait_events(7, lambda: False)
    assert finished and [e.sequence for e in later] == [8, 9]
    some, finished = job.wait_events(2, lambda: False, limit=3)  # a watcher takes the log in bounded bites
    assert not finished and [e.sequence for e in some] == [3, 4, 5]
    assert job.info().result_size == 25 and job.info().HasField("result_expire_time")


def test_events_ready_together_share_a_message_of_at_most_about_one_mib():
    from client.wire import event_deserializer  # noqa: PLC0415 (the client reads what the server framed)

    job = Job("owner", "tiny", 1)
    job.set_state(jobs_pb2.JOB_STATE_QUEUED)
    mib = 1 << 20
    data = bytes(range(256)) * (5 * mib // 2 // 256)  # 2.5 MiB: chunks of 1, 1 and 0.5 MiB
    job.complete(data, chunk_size=mib, ttl=60)
    frames, count, finished = job.wait_frames(0, lambda: False)
    assert finished and count == 6
    responses = [jobs_pb2.RunJobResponse.FromString(f) for f in frames]
    events = [e for r in responses for e in [r.event, *r.more_events]]
    assert [e.sequence for e in events] == list(range(1, 7))  # in order, none lost
    assert join_chunks([e.result for e in events if e.WhichOneof("event") == "result"]) == data
    # RECEIVED + QUEUED + the first chunk; the second chunk alone; the last one with COMPLETED
    assert [len(r.more_events) for r in responses] == [2, 0, 1]
    assert all(len(f) < mib + (64 << 10) for f in frames)
    frames, count, _ = job.wait_frames(3, lambda: False)  # a resumed watcher
    assert count == 3 and jobs_pb2.RunJobResponse.FromString(frames[0]).event.sequence == 4
    # the client reads chunks as views of the bytes, with the events beside them
    raw = [event_deserializer(jobs_pb2.RunJobResponse)(f) for f in job.wait_frames(0, lambda: False)[0]]
    events = [e for r in raw for e in [r.event, *r.more_events]]
    assert [e.sequence for e in events] == list(range(1, 7))
    assert [e.WhichOneof("event") for e in events] == ["status"] * 2 + ["result"] * 3 + ["status"]
    assert b"".join(bytes(e.result.data) for e in events[2:5]) == data



def test_lazy_frames_are_the_same_bytes_and_hold_their_result_until_sent():
    job = Job("owner", "tiny", 1)
    mib = 1 << 20
    result = ResultBytes([bytes(range(256)) * (5 * mib // 2 // 256)])
    job.complete(result, chunk_size=mib, ttl=60)
    released = []
    weakref.finalize(result, released.append, True)
    lazy, count, finished = job.wait_frames(0, lambda: False, lazy=True)
    assert (count, finished) == job.wait_frames(0, lambda: False)[1:]
    assert [b"".join(f) for f in lazy] == job.wait_frames(0, lambda: False)[0]  # joined as they are sent
    del job, result
    gc.collect()
    assert not released  # a frame still to send keeps the result's memory from being handed back
    del lazy
    gc.collect()
    assert released

class _Probe:
    """A `stop` callback that never stops, counting its calls: the reader calls it each time it wakes."""

    def __init__(self) -> None:
        self.calls = 0
        self._changed = threading.Condition()

    def __call__(self) -> bool:
        with self._changed:
            self.calls += 1
            self._changed.notify_all()
        return False

    def wait_for_more_than(self, calls: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.calls > calls, 10)


def _frames_in_thread(job: Job, after: int, linger: float) -> tuple[threading.Thread, list, _Probe]:
    got: list = []
    probe = _Probe()
    reader = threading.Thread(target=lambda: got.append(job.wait_frames(after, probe, linger=linger)))
    reader.start()
    probe.wait_for_more_than(1)  # it has looked at the events and waits (for company, or for a first event)
    return reader, got, probe


def test_status_changes_wait_for_company_so_a_short_job_is_one_message():
    job = Job("owner", "tiny", 1)
    job.set_state(jobs_pb2.JOB_STATE_QUEUED)
    reader, got, probe = _frames_in_thread(job, 0, linger=60.0)  # far longer than the test may take
    calls = probe.calls
    job.set_state(jobs_pb2.JOB_STATE_RUNNING)
    probe.wait_for_more_than(calls)  # it woke for RUNNING, and waits on
    assert reader.is_alive()
    job.complete(b"result", chunk_size=1 << 20, ttl=60)  # the job's end sends everything at once
    reader.join(10)
    assert not reader.is_alive()
    frames, count, finished = got[0]
    assert finished and count == 5 and len(frames) == 1
    response = jobs_pb2.RunJobResponse.FromString(frames[0])
    assert [e.sequence for e in [response.event, *response.more_events]] == [1, 2, 3, 4, 5]


def test_logs_never_wait_behind_a_lingering_status():
    job = Job("owner", "tiny", 1)
    job.set_state(jobs_pb2.JOB_STATE_RUNNING)
    reader, got, _ = _frames_in_thread(job, 0, linger=60.0)
    job.event(log=jobs_pb2.LogLine(text="now"))
    reader.join(10)
    assert not reader.is_alive()  # returned at the log, not after the minute of linger
    frames, count, finished = got[0]
    assert count == 3 and not finished
    response = jobs_pb2.RunJobResponse.FromString(frames[0])
    assert response.more_events[-1].log.text == "now"


def test_watchers_wake_on_new_events_without_polling():
    job = Job("owner", "tiny", 1)
    got = []
    waiter = threading.Thread(target=lambda: got.append(job.wait_events(1, lambda: False)))
    waiter.start()
    job.event(log=jobs_pb2.LogLine(text="wake up"))
    waiter.join(5)
    events, finished = got[0]
    assert [e.log.text for e in events] == ["wake up"] and not finished


def test_cancel_requests_and_finish():
    job = Job("owner", "tiny", 1)
    assert job.request_cancel("stop") and job.cancel_requested
    assert job.finish(jobs_pb2.JOB_STATE_CANCELLED, "stop", code=grpc.StatusCode.CANCELLED, ttl=1)
    assert not job.request_cancel("again") and job.failure_code == grpc.StatusCode.CANCELLED


def test_store_idempotency_ownership_and_ttl():
    store = JobStore()
    first = store.add(Job("alice", "tiny", 1, request_id="r1"))
    assert store.add(Job("alice", "tiny", 1, request_id="r1")) is first
    assert store.find_request("alice", "r1") is first and store.find_request("bob", "r1") is None
    assert store.get(first.id, "alice") is first
    with pytest.raises(NotFound):
        store.get(first.id, "bob")
    first.finish(jobs_pb2.JOB_STATE_ERROR, "failed", ttl=0)
    with pytest.raises(NotFound, match="result-ttl"):
        store.get(first.id, "alice")
    assert store.find_request("alice", "r1") is None


# ------------------------------------------------------------------------------------------- auth, limits


class _Context:
    """The two things Authenticator reads from a grpc.ServicerContext."""

    def __init__(self, peer: str, metadata=()):
        self._peer, self._metadata = peer, metadata

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self):
        return [_Item(k, v) for k, v in self._metadata]


class _Item:
    def __init__(self, key, value):
        self.key, self.value = key, value


@pytest.mark.parametrize("peer, local", [
    ("ipv4:127.0.0.1:5000", True), ("ipv6:[::1]:5000", True), ("ipv6:[::ffff:127.0.0.1]:1", True),
    ("unix:/tmp/sock", True), ("ipv4:10.1.2.3:5000", False), ("ipv6:[2001:db8::1]:1", False), ("x", False),
])
def test_loopback_peers(peer, local):
    assert is_loopback(peer) is local


def test_authenticator(tmp_path):
    open_server = Authenticator()
    assert open_server.identify(_Context("ipv4:127.0.0.1:1")) == "loopback"
    with pytest.raises(Unauthenticated, match="--api-keys"):
        open_server.identify(_Context("ipv4:10.0.0.2:1"))
    path = tmp_path / "keys"
    path.write_text("# comment\n\nsecret-key-1\n")
    keyed = Authenticator(read_keys(path))
    owner = keyed.identify(_Context("ipv4:10.0.0.2:1", [("authorization", "Bearer secret-key-1")]))
    assert owner != "loopback" and "secret" not in owner
    with pytest.raises(Unauthenticated, match="TETHER_API_KEY"):
        keyed.identify(_Context("ipv4:127.0.0.1:1"))
    with pytest.raises(Unauthenticated, match="not one this server accepts"):
        keyed.identify(_Context("ipv4:127.0.0.1:1", [("authorization", "Bearer nope")]))
    (tmp_path / "empty").write_text("# none\n")
    with pytest.raises(ValueError, match="no keys"):
        read_keys(tmp_path / "empty")


def test_job_limits_never_exceed_the_servers():
    limits = Limits(job_timeout=10, max_result_bytes=100, local_call_timeout=5)
    assert JobLimits.of(jobs_pb2.JobSpec(), limits) == JobLimits(10, 100, 5)
    asked = jobs_pb2.JobSpec(timeout={"seconds": 60}, max_result_bytes=50, local_call_timeout={"seconds": 1})
    assert JobLimits.of(asked, limits) == JobLimits(10, 50, 1)


def test_job_log_is_line_buffered_like_print():
    ours, theirs = multiprocessing.Pipe()
    log = JobLog("job-1", theirs)
    log("a", 1, sep="-")
    log("partial", end="")
    log(" rest")
    log("x\ny")
    log("flushed", end="", flush=True)
    log("tail", end="")
    log.flush()
    lines = []
    while ours.poll():
        message = ours.recv()
        assert message.job_id == "job-1"
        lines.append(message.text)
    assert lines == ["a-1", "partial rest", "x", "y", "flushed", "tail"]


# ---------------------------------------------------------------------------------------- failures, results


def test_failures_keep_only_user_frames_under_user_names():
    namespace: dict = {}
    code = compile("\n\ndef f():\n    return 1 / 0\n", "user.py [job 1]", "exec")
    exec(code, namespace)
    try:
        try:
            namespace["f"]()
        except ZeroDivisionError as error:
            raise ValueError("wrapped") from error
    except ValueError as error:
        failure = failure_of(error, {"user.py [job 1]": "user.py"})
    assert failure.type == "builtins.ValueError" and not failure.frames  # raised in this test file
    cause = failure.cause
    assert cause.type == "builtins.ZeroDivisionError"
    assert [(f.filename, f.line, f.function, f.user_code) for f in cause.frames] == [("user.py", 4, "f", True)]
    assert cause.traceback.startswith("Traceback (most recent call last):\n  File \"user.py\", line 4, in f\n")
    assert cause.traceback.endswith("ZeroDivisionError: division by zero\n")


def test_results_name_stand_ins_and_leave_out_what_a_client_cannot_load():
    lines = []
    data = encode_result(
        {"a": torch.ones(2), "u": UnsavedValue("u"), "r": NotReached("r", "the trace was stopped early"),
         "g": torch.Generator(), "f": lambda: 1, "n": 3},
        to_value, limit=1 << 20, log=lines.append)
    result = jobs_pb2.JobResult.FromString(data)
    assert sorted(result.saved) == ["a", "n"] and from_value(result.saved["n"]) == 3
    assert list(result.unsaved) == ["u"] and list(result.unreached) == ["r"]
    assert result.unreached_reason == "the trace was stopped early"
    assert len(lines) == 1 and "`g`" in lines[0] and "stays on the server" in lines[0]  # `f`: silently
    with pytest.raises(ResultTooLarge, match=r"largest saved values: a"):
        encode_result({"a": torch.zeros(1000)}, to_value, limit=100)


def test_limits_defaults_are_sane():
    limits = Limits()
    assert limits.chunk_size <= 1 << 20 and limits.queue_size > 0 and limits.local_call_timeout < limits.job_timeout


def test_a_refusal_from_the_clusters_core_is_raised_as_the_error_it_was():
    from tether.server.cluster import Refused
    from tether.server.errors import QueueFull, ServerError

    error = Refused("QueueFull", "model 'tiny' has 16 jobs waiting", "RESOURCE_EXHAUSTED").error()
    assert type(error) is QueueFull and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(error) == "model 'tiny' has 16 jobs waiting"
    error = Refused("Exception", "not one of ours", "INTERNAL").error()  # only the server's own error classes
    assert type(error) is ServerError and error.code == grpc.StatusCode.INTERNAL


# ------------------------------------------------------------------------------------------- batching


def _arrivals(cond: threading.Condition, pending: collections.deque, entries: list) -> threading.Thread:
    """A thread that queues `entries` one at a time, each once it holds `cond`: only while gather waits on it
    (the test holds it otherwise), so an entry gets in only if gather waited for it."""
    def arrive():
        for entry in entries:
            with cond:
                pending.append(entry)
                cond.notify()
    return threading.Thread(target=arrive, daemon=True)


def test_after_a_batched_run_a_job_waits_for_the_batchs_clients_to_send_their_next_jobs():
    def entry():
        return SimpleNamespace(batch_key=("k",), tokens=1)

    company = Company()
    company.ran(3, 0.02, waiting=1, wait=0.005)  # a batch of 3 ended with one job queued: 4 clients to come back
    assert company.expected() == (4, 0.005)
    cond, pending, taken = threading.Condition(), collections.deque(), []
    first, *later = [entry() for _ in range(5)]
    arrivals = _arrivals(cond, pending, later)
    with cond:
        arrivals.start()
        # a long wait allowed: gather returns once the 4 expected are there, not at its end
        batch = gather(first, pending, cond, BatchPolicy(wait=30.0), taken.append, (4, 30.0))
    arrivals.join(30)
    # (entries are told apart by identity; an arrival may slip in beside the last expected one)
    assert batch[0] is first and len(batch) >= 4 and [id(e) for e in batch[1:]] == [id(e) for e in taken]
    assert [id(e) for e in taken + list(pending)] == [id(e) for e in later]


def test_a_lone_job_never_waits_for_company_that_is_not_expected():
    def entry():
        return SimpleNamespace(batch_key=("k",), tokens=1)

    company = Company()
    company.ran(1, 0.02, waiting=0, wait=0.005)  # a lone job ran: nobody is expected back
    assert company.expected() == (0, 0.0)
    cond, pending = threading.Condition(), collections.deque()
    first, second = entry(), entry()
    arrivals = _arrivals(cond, pending, [second])
    with cond:
        arrivals.start()
        batch = gather(first, pending, cond, BatchPolicy(wait=30.0), lambda e: None, company.expected())
    arrivals.join(30)
    assert len(batch) == 1 and batch[0] is first and len(pending) == 1 and pending[0] is second


def test_the_wait_for_a_batchs_clients_ends_once_they_are_back_even_with_other_kinds_of_jobs():
    cond, pending = threading.Condition(), collections.deque()
    first, other, same = (SimpleNamespace(batch_key=key, tokens=1) for key in (("generate",), ("trace",), ("generate",)))
    arrivals = _arrivals(cond, pending, [other, same])
    started = time.monotonic()
    with cond:
        arrivals.start()
        batch = gather(first, pending, cond, BatchPolicy(wait=30.0), lambda e: None, (3, 30.0))
    arrivals.join(30)
    assert time.monotonic() - started < 15  # not the 30 s it may wait at most
    assert [id(e) for e in batch] == [id(first), id(same)] and list(pending) == [other]


def test_a_forming_batch_waits_while_jobs_keep_arriving():
    cond, pending = threading.Condition(), collections.deque()
    first, second, *later = [SimpleNamespace(batch_key=("k",), tokens=1) for _ in range(4)]
    pending.append(second)
    arrivals = _arrivals(cond, pending, later)
    with cond:
        arrivals.start()
        batch = gather(first, pending, cond, BatchPolicy(wait=30.0, max_batch=4), lambda e: None)
    arrivals.join(30)
    assert [id(e) for e in batch] == [id(e) for e in (first, second, *later)]


def test_a_job_is_tokenized_only_when_a_batch_forms_and_the_token_budget_holds(gpt2):
    model = LanguageModel(gpt2[0], tokenizer=gpt2[1])
    program = Program(kind="trace", source="pass", filename="<t>", first_line=1, args=("The quick brown fox",))
    want = batch_tokens(model, program)
    cond, taken = threading.Condition(), []

    def entry():
        key, tokens = batch_info(model, program)
        assert isinstance(tokens, Tokens)
        return SimpleNamespace(batch_key=key, tokens=tokens)

    alone = entry()
    with cond:
        assert gather(alone, collections.deque(), cond, BatchPolicy(wait=0.0), taken.append) == [alone]
    assert alone.tokens._count is None  # a job that ran alone was never tokenized here
    first, second, third = entry(), entry(), entry()
    with cond:
        batch = gather(first, collections.deque([second, third]), cond, BatchPolicy(wait=0.0, max_tokens=2 * want),
                       taken.append)
    assert batch == [first, second] and taken == [second]  # the third would pass the token budget
    assert int(first.tokens) == want and pickle.loads(pickle.dumps(third.tokens)) == want
