"""Cross-job batching on the worker processes: the jobs of a batch share one worker, so what ends the worker (a
crash, a job that will not stop after its cancel) ends every job of the batch still running, with a message
saying why; the worker restarts and the queue goes on. A cancel reaches the worker at once.

Jobs are made to share a batch by holding the model's only worker in a `local()` block while they queue.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_isolation import SWALLOWED
from test_server import QUICK_SOURCE, WAIT, Client, assert_serving, local_run, program, spec, value_map
from test_server_batching import held_worker, until

from tether.runtime import tiny
from tether.v1 import jobs_pb2

SERVER_OPTIONS = {"local_call_timeout": 30.0}
LOOP = """
print("started")
while True:
    pass
"""

pytestmark = pytest.mark.usefixtures("client_config")


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2()}


@pytest.fixture
def client(server):
    c = Client(server.address)
    yield c
    c.close()


def _pid(server) -> int:
    return server.hub.queues["tiny"].replicas[0].worker_pid(timeout=WAIT)


def _batched(server, client: Client, sources: list[str]) -> list[str]:
    """One job per source, queued while the worker is held so they run as one batch; their ids once all run."""
    with held_worker(server) as queue:
        ids = [client.submit(spec(program(source, "hello"))).job_id for source in sources]
        until(lambda: queue.depth == len(ids))
    records = [server.hub.store.find(job_id) for job_id in ids]
    until(lambda: all(r.status.state == jobs_pb2.JOB_STATE_RUNNING and r.status.batch_size == len(ids)
                      for r in records))
    return ids


def test_a_worker_killed_mid_batch_fails_every_job_of_the_batch(server, client):
    pid = _pid(server)
    ids = _batched(server, client, [LOOP, QUICK_SOURCE])
    os.kill(pid, signal.SIGKILL)
    for job_id in ids:
        final = client.wait(job_id).final
        assert final.state == jobs_pb2.JOB_STATE_ERROR, final
        for words in ("worker process", "crashed", "SIGKILL", "the other jobs of its batch of 2 ended with it"):
            assert words in final.failure.message, final.failure.message
    assert _pid(server) != pid
    assert_serving(client)


def test_a_job_that_ignores_its_cancel_takes_its_batch_down_with_it(server, client):
    pid = _pid(server)
    stuck, other = _batched(server, client, [SWALLOWED, QUICK_SOURCE])
    client.cancel(stuck, "stop it")
    final = client.wait(stuck).final
    assert final.state == jobs_pb2.JOB_STATE_CANCELLED and "stop it" in final.message, final
    final = client.wait(other).final
    assert final.state == jobs_pb2.JOB_STATE_ERROR, final
    assert f"shared a batched run with job {stuck}" in final.failure.message, final.failure.message
    assert _pid(server) != pid
    assert_serving(client)


def test_a_cancelled_job_of_a_batch_ends_cancelled_and_the_other_completes(server, client):
    looping, quick = _batched(server, client, ["logits = model.lm_head.output.save()\n" + LOOP, QUICK_SOURCE])
    client.cancel(looping, "enough")  # the watchdog interrupts its loop: the batch runs on without it
    assert client.wait(looping).final.state == jobs_pb2.JOB_STATE_CANCELLED
    outcome = client.wait(quick)
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    saved, expected = value_map(client.read_result(quick))["out"], local_run(QUICK_SOURCE, "hello")["out"]
    assert saved.shape == expected.shape and torch.allclose(saved, expected, atol=1e-5)
    assert_serving(client)
