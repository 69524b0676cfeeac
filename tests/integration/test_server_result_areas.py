"""Large results through a worker's reusable result areas, on a real loopback server: bit-equal to local runs,
readable again and after the worker died, and the same area written again once a result's record is gone.
"""

from __future__ import annotations

import gc
import os
import signal

import pytest
import torch
from test_server import WAIT, Client, Outcome, events_of, local_run, program, spec

from tether import tiny, values, wire
from tether.server.app import start_server
from tether.v1 import jobs_pb2

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="result areas need /dev/shm")

# result_ttl 0: a job's record (and its result) is dropped at the next job's submission
SERVER_OPTIONS = {"result_ttl": 0.0, "max_batch": 1}
BIG = """
g = torch.Generator().manual_seed(seed)
big = torch.randn(1_500_000, generator=g).save()
"""


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2()}


@pytest.fixture(scope="module")
def keeping_server():
    """A second server that keeps results (the default result_ttl)."""
    handle = start_server(served(), host="127.0.0.1", port=0, max_batch=1)
    assert handle.wait_ready(timeout=180)
    yield handle
    handle.stop(grace=0)


def _replica(server):
    return server.hub.queues["tiny"].replicas[0]


def _areas_of(pid: int) -> set[str]:
    """The result areas the worker process has mapped."""
    with open(f"/proc/{pid}/maps") as maps:
        return {line.split()[5] for line in maps if "-area-" in line}


def _expected(seed: int) -> torch.Tensor:
    return local_run(BIG, "hi", bindings={"seed": seed})["big"].as_subclass(torch.Tensor)


def _run_big(client: Client, seed: int) -> tuple[str, Outcome]:
    """Submit the job, then read all its events (the result's chunks included) with WatchJob."""
    job_id = client.submit(spec(program(BIG, "hi", bindings={"seed": values.to_value(seed)}))).job_id
    return job_id, Outcome([e for r in client.watch(job_id) for e in events_of(r)])


def test_results_are_bit_equal_and_an_area_is_written_again_once_its_result_is_gone(server, client):
    pid = _replica(server).worker_pid(timeout=WAIT)
    seen: list[set[str]] = []
    for seed in range(4):
        gc.collect()  # (the previous job's record went at this submission: nothing else holds its result)
        job_id, outcome = _run_big(client, seed)
        assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
        assert torch.equal(values.from_value(outcome.result.saved["big"]), _expected(seed))
        seen.append(_areas_of(pid))
    assert len(set().union(*seen)) <= 2, seen  # four results, one or two areas: each written again


def test_a_result_read_twice_and_after_its_worker_was_killed(keeping_server):
    client = Client(keeping_server.address)
    replica = _replica(keeping_server)
    pid = replica.worker_pid(timeout=WAIT)
    job_id, outcome = _run_big(client, 7)
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    first = wire.join_chunks([e.result for e in outcome.events if e.WhichOneof("event") == "result"])
    assert len(first) > 4 << 20
    os.kill(pid, signal.SIGKILL)  # the worker that wrote the result dies: the front door's map keeps it
    again = wire.join_chunks(client.read_result(job_id))
    assert again == first
    assert torch.equal(values.from_value(jobs_pb2.JobResult.FromString(again).saved["big"]), _expected(7))
    _, outcome = _run_big(client, 8)  # on a new worker (the dead one is found and replaced): its own areas
    assert torch.equal(values.from_value(outcome.result.saved["big"]), _expected(8))
    assert replica.worker_pid(timeout=WAIT) != pid
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"tether-{pid}-")]
    assert wire.join_chunks(client.read_result(job_id)) == first
    client.close()
