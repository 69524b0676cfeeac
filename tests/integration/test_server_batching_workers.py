"""Cross-job batching on the worker processes: a cancel reaches the worker at once, and a cancelled job of a batch
ends alone (what ends the batch's worker is in test_server_batch_reruns.py).

Jobs are made to share a batch by holding the model's only worker in a `local()` block while they queue.
"""

from __future__ import annotations

import pytest
import torch
from test_server import QUICK_SOURCE, Client, assert_serving, local_run, program, spec, value_map
from test_server_batching import held_worker, until

from tether import tiny
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


def _batched(server, client: Client, sources: list[str]) -> list[str]:
    """One job per source, queued while the worker is held so they run as one batch; their ids once all run."""
    with held_worker(server) as queue:
        ids = [client.submit(spec(program(source, "hello"))).job_id for source in sources]
        until(lambda: queue.depth == len(ids))
    records = [server.hub.store.find(job_id) for job_id in ids]
    until(lambda: all(r.status.state == jobs_pb2.JOB_STATE_RUNNING and r.status.batch_size == len(ids)
                      for r in records))
    return ids


def test_a_cancelled_job_of_a_batch_ends_cancelled_and_the_other_completes(server, client):
    looping, quick = _batched(server, client, ["logits = model.lm_head.output.save()\n" + LOOP, QUICK_SOURCE])
    client.cancel(looping, "enough")  # the watchdog interrupts its loop: the batch runs on without it
    assert client.wait(looping).final.state == jobs_pb2.JOB_STATE_CANCELLED
    outcome = client.wait(quick)
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    saved, expected = value_map(client.read_result(quick))["out"], local_run(QUICK_SOURCE, "hello")["out"]
    assert saved.shape == expected.shape and torch.allclose(saved, expected, atol=1e-5)
    assert_serving(client)
