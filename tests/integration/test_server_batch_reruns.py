"""Jobs of a batch that run again alone, through a real loopback server: a job whose local() block keeps its
batch waiting past --batch-local-wait leaves it (the others finish without waiting for its client), and the jobs
a batch's worker still ran when it crashed or was killed because of another job run again alone. Each gets its
solo result, and its client never gets a log line, a step or a local() call twice.

Jobs are made to share a batch by holding the model's only worker in a `local()` block while they queue.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import crashers
import pytest
import torch
from test_isolation import SWALLOWED, _watch_until_log
from test_server import WAIT, Client, Outcome, assert_serving, local_run, program, spec, value_map
from test_server_batching import held_worker, in_threads, local_llm, trace_job, until

import tether
from tether import CONFIG, LanguageModel, tiny
from tether.server.app import start_server
from tether.server.reruns import Sent
from tether.v1 import jobs_pb2, program_pb2, values_pb2

SERVER_OPTIONS = {"local_call_timeout": 30.0, "batch_local_wait": 30.0, "job_memory": 200 << 20}
LEAVE_AFTER = 0.3  # seconds of --batch-local-wait on the server of the tests where a job leaves its batch
CRASHER = values_pb2.Value(model_reference=values_pb2.ModelReference(name="crasher"))
SCALED = """
print("before")
h = model.transformer.h[0].mlp.output
with tether.local():
    scale = float(h.detach().abs().mean()) + 1.0
model.transformer.h[0].mlp.output = h * scale
print("after")
logits = model.lm_head.output.save()
"""
SCALED_BLOCK = program_pb2.LocalBlock(block_id="scale", first_line=13, last_line=13, reads=["h"], writes=["scale"])
PLAIN = "h = model.transformer.h[1].output.save()\nout = model.lm_head.output.save()\n"
LOOP = 'logits = model.lm_head.output.save()\nprint("started")\nwhile True:\n    pass\n'

pytestmark = pytest.mark.usefixtures("client_config")


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2(), "crasher": crashers.crasher()}


@pytest.fixture(scope="module")
def leaving_server():
    """A second server whose batched jobs leave their batch after LEAVE_AFTER s in local() blocks (the module's
    own server allows 30 s, so the other tests' prompt answers never make a job leave on a busy machine)."""
    handle = start_server({"tiny": tiny.tiny_gpt2()}, host="127.0.0.1", port=0, local_call_timeout=30.0,
                          batch_local_wait=LEAVE_AFTER)
    assert handle.wait_ready(timeout=180), "the server's workers did not start"
    yield handle
    handle.stop(grace=0)


@pytest.fixture
def leaving(leaving_server, monkeypatch):
    """The leaving server, with the client pointed at it."""
    monkeypatch.setattr(CONFIG.API, "_host", leaving_server.address)
    return leaving_server


def _pid(server, model: str = "tiny") -> int:
    return server.hub.queues[model].replicas[0].worker_pid(timeout=WAIT)


def _scale(block_id: str, reads: dict) -> dict:
    return {"scale": float(reads["h"].abs().mean()) + 1.0}


def _kinds(outcome: Outcome, kind: str) -> list:
    return [e for e in outcome.events if e.WhichOneof("event") == kind]


def _close(saved: torch.Tensor, expected: torch.Tensor) -> None:
    expected = expected.as_subclass(torch.Tensor)
    assert saved.shape == expected.shape and torch.allclose(saved, expected, atol=1e-5), (saved - expected).abs().max()


def _ran_in_batch(server, ids: list[str]) -> None:
    records = [server.hub.store.find(job_id) for job_id in ids]
    until(lambda: all(r.status.batch_size == len(ids) for r in records))


@contextlib.contextmanager
def _held_crasher(server, client: Client):
    """Hold the crasher model's only worker in a local() block (a job of its own) until the `with` block ends."""
    x = torch.zeros(1, 4)
    source = "h = model.output\nwith tether.local():\n    z = 1\nout = model.output.save()\n"
    holder = client.stream(spec(program(source, x, model="crasher", bindings={"model": CRASHER})))
    call = holder.until(lambda e: e.WhichOneof("event") == "local_call").local_call
    try:
        yield server.hub.queues["crasher"]
    finally:
        holder.answer(call, {"z": 1})
        assert holder.finish().final.state == jobs_pb2.JOB_STATE_COMPLETED


def test_a_local_block_that_keeps_its_batch_waiting_moves_its_job_out(leaving):
    """The others finish while the slow block's client has not answered; its job then runs alone, is asked
    nothing twice and prints nothing twice."""
    server, client = leaving, Client(leaving.address)
    prompts = ["The quick brown fox", "Hi", "a b c"]
    with held_worker(server) as queue:
        slow = client.stream(spec(program(SCALED, prompts[0], local_blocks=[SCALED_BLOCK])))
        until(lambda: queue.depth == 1)
        others = [client.submit(spec(program(PLAIN, p))).job_id for p in prompts[1:]]
        until(lambda: queue.depth == 3)
    call = slow.until(lambda e: e.WhichOneof("event") == "local_call").local_call
    for job_id, prompt in zip(others, prompts[1:]):  # (the slow job's client has not answered yet)
        outcome = client.wait(job_id)
        assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
        assert max(s.batch_size for s in (e.status for e in _kinds(outcome, "status"))) == 3
        saved, expected = value_map(client.read_result(job_id)), local_run(PLAIN, prompt)
        for name in expected:
            _close(saved[name], expected[name])
    slow.answer(call, _scale(call.block_id, value_map([call.values])))
    outcome = slow.finish(_scale)
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    assert outcome.logs == ["before", "after"]
    assert len(_kinds(outcome, "local_call")) == 1
    again = [e.status.message for e in _kinds(outcome, "status") if e.status.message.startswith("running again")]
    assert len(again) == 1 and "--batch-local-wait" in again[0], again
    expected = local_run(SCALED, prompts[0])
    _close(outcome.saved()["logits"], expected["logits"])
    assert_serving(client)
    client.close()


def test_a_block_that_waits_for_the_other_jobs_of_its_batch_gets_its_solo_result(leaving):
    """Through the real client: the block returns only once the other jobs of its batch have ended, which they
    can only do by not waiting for it."""
    others_done = threading.Event()
    ended: list = []

    def waiting(llm, remote=True):
        with llm.trace("The quick brown fox", remote=remote) if remote else llm.trace("The quick brown fox"):
            h = llm.transformer.h[0].mlp.output
            with tether.local():
                if not others_done.wait(30):
                    raise TimeoutError("the other jobs did not end while this block ran")
                scale = float(h.detach().abs().mean()) + 1.0
            llm.transformer.h[0].mlp.output = h * scale
            logits = llm.lm_head.output.save()
        return {"logits": logits}

    def other(job):
        result = job(LanguageModel("tiny"))
        ended.append(result)
        if len(ended) == 2:
            others_done.set()
        return result

    jobs = [trace_job(2.0, "Hi"), trace_job(0.5, "a b c")]
    results = in_threads(leaving, [lambda: waiting(LanguageModel("tiny"))] + [lambda j=j: other(j) for j in jobs])
    for result, expected in zip(results, [waiting(local_llm(), remote=False)] + [j(local_llm(), remote=False)
                                                                                  for j in jobs]):
        assert not isinstance(result, BaseException), result
        for name in expected:
            _close(result[name], expected[name])


def test_the_others_of_a_job_that_ignores_its_cancel_run_again_alone(server, client):
    """The stuck job's worker is killed; the other job had printed and had its local() block answered: it runs
    again alone, and its client sees each line and the call once."""
    pid = _pid(server)
    stuck_source = 'logits = model.lm_head.output.save()\nprint("looping")\n' + SWALLOWED
    with held_worker(server) as queue:
        other = client.stream(spec(program(SCALED, "Hello there", local_blocks=[SCALED_BLOCK])))
        until(lambda: queue.depth == 1)
        stuck = client.submit(spec(program(stuck_source, "hi"))).job_id
        until(lambda: queue.depth == 2)
    call = other.until(lambda e: e.WhichOneof("event") == "local_call").local_call
    other.answer(call, _scale(call.block_id, value_map([call.values])))
    _watch_until_log(client, stuck)  # it loops now, after the other job's block was answered
    client.cancel(stuck, "stop it")
    final = client.wait(stuck).final
    assert final.state == jobs_pb2.JOB_STATE_CANCELLED and "stop it" in final.message, final
    outcome = other.finish(_scale)
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    assert outcome.logs == ["before", "after"] and len(_kinds(outcome, "local_call")) == 1
    again = [e.status.message for e in _kinds(outcome, "status") if e.status.message.startswith("running again")]
    assert len(again) == 1 and f"shared a batched run with job {stuck}" in again[0], again
    _close(outcome.saved()["logits"], local_run(SCALED, "Hello there")["logits"])
    assert _pid(server) != pid
    assert_serving(client)


def test_a_crash_in_a_batch_fails_only_the_job_that_crashes_it(server, client):
    xs = [torch.rand(1, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    xs[1] = torch.full((1, 4), crashers.SEGFAULT)
    source = "out = model.output.save()\n"
    pid = _pid(server, "crasher")
    with _held_crasher(server, client) as queue:
        ids = [client.submit(spec(program(source, x, model="crasher", bindings={"model": CRASHER}))).job_id
               for x in xs]
        until(lambda: queue.depth == 3)
    _ran_in_batch(server, ids)
    for i, job_id in enumerate(ids):
        outcome = client.wait(job_id)
        if i == 1:
            assert outcome.final.state == jobs_pb2.JOB_STATE_ERROR, outcome.final
            message = outcome.final.failure.message
            assert "SIGSEGV" in message and "It ran alone because the worker of the batch of 3 jobs" in message
            continue
        assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
        assert torch.equal(value_map(client.read_result(job_id))["out"], crashers.crasher()(xs[i]))
    assert _pid(server, "crasher") != pid
    assert_serving(client)


def test_a_worker_killed_mid_batch_runs_its_jobs_again_alone(server, client):
    """Killed from outside (no job to blame): each job runs again alone; the looping one prints its line once."""
    pid = _pid(server)
    quick = "out = model.lm_head.output.save()\n"
    with held_worker(server) as queue:
        ids = [client.submit(spec(program(source, "hello"))).job_id for source in (quick, LOOP)]
        until(lambda: queue.depth == 2)
    _ran_in_batch(server, ids)
    looping = server.hub.store.find(ids[1])
    _watch_until_log(client, ids[1])
    os.kill(pid, signal.SIGKILL)
    outcome = client.wait(ids[0])
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    again = [e.status.message for e in _kinds(outcome, "status") if e.status.message.startswith("running again")]
    assert len(again) == 1 and "crashed (killed by signal SIGKILL)" in again[0], again
    _close(value_map(client.read_result(ids[0]))["out"], local_run(quick, "hello")["out"])
    until(lambda: looping.status.message.startswith("running again"))
    client.cancel(ids[1], "enough")
    outcome = client.wait(ids[1])
    assert outcome.final.state == jobs_pb2.JOB_STATE_CANCELLED, outcome.final
    assert outcome.logs == ["started"]
    assert_serving(client)


def test_a_batch_over_the_memory_limit_runs_its_jobs_again_alone(server, client):
    """Over the limit no job is to blame yet: each runs alone, and only the one that is over it alone fails."""
    quick = 'print("hi")\nout = model.lm_head.output.save()\n'
    big = """
    logits = model.lm_head.output.save()
    big = torch.ones(64, 1024, 1024)
    while True:
        big = big + 0
    """
    with held_worker(server) as queue:
        ids = [client.submit(spec(program(source, "hello"))).job_id for source in (quick, big)]
        until(lambda: queue.depth == 2)
    outcome = client.wait(ids[0])
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    assert outcome.logs == ["hi"]
    again = [e.status.message for e in _kinds(outcome, "status") if e.status.message.startswith("running again")]
    assert len(again) == 1 and "--job-memory" in again[0], again
    _close(value_map(client.read_result(ids[0]))["out"], local_run(quick, "hello")["out"])
    final = client.wait(ids[1]).final
    assert final.state == jobs_pb2.JOB_STATE_ERROR and "the job allocated" in final.failure.message, final
    assert_serving(client)


def test_sent_skips_what_an_earlier_run_sent():
    sent = Sent()
    sent.begin()
    assert [sent.line(), sent.line(), sent.progress(1), sent.progress(2)] == [True, True, True, True]
    sent.begin()  # the re-run
    assert [sent.line(), sent.line(), sent.line()] == [False, False, True]
    assert [sent.progress(1), sent.progress(2), sent.progress(3)] == [False, False, True]
