"""The front door's LocalLink for a job that runs again alone: a call not answered within its hold stays open
and is waited for by the re-run, never sent twice; kept answers are replayed; a re-run that goes another way
fails, saying so; the answer a worker waits for goes to it straight from the stream's reader. No model, no
network."""

from __future__ import annotations

import threading
import time

import pytest

from tether.server import local_calls
from tether.server.errors import LocalBlockFailed, LocalCallFailed
from tether.server.jobs import Job
from tether.server.local_calls import LocalLink, StillOpen
from tether.v1 import failure_pb2, jobs_pb2

LONG = 30.0  # seconds: no test waits that long; the bounds under test are short holds


def _link() -> tuple[Job, LocalLink]:
    job = Job("owner", "tiny", 1)
    link = LocalLink(job)
    link.attach()
    return job, link


def _asked(job: Job) -> list[str]:
    """The call ids of the job's local_call events (what its client was asked)."""
    events, _ = job.wait_events(0, lambda: True, timeout=0, limit=1000)
    return [e.local_call.call_id for e in events if e.WhichOneof("event") == "local_call"]


def _answer(link: LocalLink, call_id: str, data: bytes) -> None:
    chunk = jobs_pb2.Chunk(offset=0, data=data, total_size=len(data))
    link.deliver(jobs_pb2.LocalResult(call_id=call_id, values=chunk))


def _call(link: LocalLink, call_id: str, block_id: str = "b", hold: float | None = None, direct=None):
    return link.call(call_id, block_id, [b"payload"], time.monotonic() + LONG, LONG, TimeoutError, hold=hold,
                     direct=direct)


def test_a_call_past_its_hold_stays_open_and_its_rerun_gets_the_answer_without_asking_again():
    job, link = _link()
    link.keep()
    started = time.monotonic()
    with pytest.raises(StillOpen):
        _call(link, "1", hold=0.05)
    assert time.monotonic() - started < LONG / 2
    _answer(link, "1", b"late answer")  # the client answers while the job waits in the queue
    assert _call(link, "1") == b"late answer"
    assert _asked(job) == ["1"]


def test_kept_answers_are_replayed_and_a_rerun_that_goes_elsewhere_fails():
    job, link = _link()
    link.keep()
    _answer(link, "1", b"early")  # dropped: no call is open yet
    with pytest.raises(StillOpen):
        _call(link, "1", hold=0.0)
    _answer(link, "1", b"one")
    assert _call(link, "1") == b"one"
    assert _call(link, "1") == b"one"  # the re-run's first call: replayed
    with pytest.raises(LocalCallFailed, match="reached the local\\(\\) block other where its first run had"):
        _call(link, "1", block_id="other")
    assert _asked(job) == ["1"]


def test_answers_past_the_bound_are_dropped_and_the_job_is_no_longer_replayable(monkeypatch):
    monkeypatch.setattr(local_calls, "KEEP_BYTES", 4)
    job, link = _link()
    link.keep()
    with pytest.raises(StillOpen):
        _call(link, "1", hold=0.0)
    _answer(link, "1", b"too large")
    assert _call(link, "1") == b"too large"
    assert not link.replayable


def test_a_job_run_alone_keeps_nothing():
    job, link = _link()
    with pytest.raises(StillOpen):
        _call(link, "1", hold=0.0)
    _answer(link, "1", b"x")
    assert _call(link, "1") == b"x"
    with pytest.raises(StillOpen):  # not kept: a job that ran alone is never run again, so this is a new call
        _call(link, "1", hold=0.0)
    assert _asked(job) == ["1", "1"] and link.replayable


def test_a_rerun_that_reaches_another_block_at_the_open_call_fails():
    job, link = _link()
    link.keep()
    with pytest.raises(StillOpen):
        _call(link, "1", block_id="first", hold=0.0)
    with pytest.raises(LocalCallFailed, match="reached the local\\(\\) block second where its first run had"):
        _call(link, "1", block_id="second")
    assert _asked(job) == ["1"]


def _call_in_thread(link: LocalLink, job: Job, direct, **kwargs) -> tuple[threading.Thread, list]:
    """A relay's call with a `direct` sender, in a thread, once it has asked the client."""
    returned: list = []
    thread = threading.Thread(target=lambda: returned.append(_call(link, "1", direct=direct, **kwargs)))
    thread.start()
    with job.cond:
        assert job.cond.wait_for(lambda: len(job._events) > 1, LONG)  # (its first event is RECEIVED)
    return thread, returned


def test_the_answer_goes_straight_to_the_waiting_worker_and_is_still_kept_for_a_rerun():
    job, link = _link()
    link.keep()
    sent: list = []
    thread, returned = _call_in_thread(link, job, sent.append)
    _answer(link, "1", b"answer")
    thread.join(LONG)
    assert sent == [bytearray(b"answer")] and returned == [None]  # the caller sends nothing itself
    _answer(link, "1", b"again")  # (the call ended: dropped)
    assert _call(link, "1") == b"answer"  # a re-run replays it
    assert _asked(job) == ["1"]


def test_a_block_failure_goes_straight_to_the_waiting_worker():
    job, link = _link()
    sent: list = []
    thread, returned = _call_in_thread(link, job, sent.append)
    link.deliver(jobs_pb2.LocalResult(call_id="1", failure=failure_pb2.Failure(message="boom")))
    thread.join(LONG)
    assert returned == [None] and len(sent) == 1
    assert isinstance(sent[0], LocalBlockFailed) and "boom" in str(sent[0])


def test_an_answer_after_the_hold_is_not_sent_directly_but_returned_to_the_rerun():
    job, link = _link()
    link.keep()
    sent: list = []
    with pytest.raises(StillOpen):
        _call(link, "1", hold=0.0, direct=sent.append)
    _answer(link, "1", b"late")
    assert sent == []  # nobody waits for it now: the re-run gets it
    assert _call(link, "1", direct=sent.append) == b"late" and sent == []


def _payload_bytes(job: Job) -> int:
    events, _ = job.wait_events(0, lambda: True, timeout=0, limit=1000)
    return sum(len(e.local_call.values.data) for e in events if e.WhichOneof("event") == "local_call")


def test_a_posted_call_goes_to_its_worker_once_and_the_log_lets_go_of_its_values():
    job, link = _link()
    got: list = []
    assert link.post("1", "b", [b"x" * 4096], LONG, got.append) is None
    assert _asked(job) == ["1"] and _payload_bytes(job) == 4096
    _answer(link, "1", b"")
    _answer(link, "1", b"again")  # (a second answer to the same call is dropped)
    assert got == [b""]
    assert _payload_bytes(job) == 0  # no caller waits to forget them: the last call of a job too
    assert link.post("2", "b", [b"y"], LONG, got.append) is None  # the worker calls again once it has the answer
    assert _asked(job) == ["1", "2"]


def test_a_posted_call_that_can_get_no_answer_expires_with_why_and_lets_go_of_its_values():
    job, link = _link()
    got: list = []
    link.post("1", "b", [b"x" * 4096], LONG, got.append)
    assert link.expire(time.monotonic() + LONG, TimeoutError) is None  # (still due)
    link.detach("the client disconnected")
    error = link.expire(time.monotonic() + LONG, TimeoutError)
    assert isinstance(error, LocalCallFailed) and "the client disconnected" in str(error)
    assert _payload_bytes(job) == 0
    _answer(link, "1", b"")  # too late: not taken
    assert got == [] and link.expire(time.monotonic() + LONG, TimeoutError) is None
