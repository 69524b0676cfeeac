"""A server restarted on the same port under a live client: the client's existing objects carry on, and an
error about a job the old server accepted names the job and how to re-attach (blocking, non-blocking, asyncio)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest
import torch

import tether
from tether import CONFIG, NNsight, tiny
from tether.client import RemoteBackend, aio
from tether.client.channel import close_all
from tether.server import service
from tether.server.app import start_server
from tether.v1 import jobs_pb2

WAIT = 60.0  # seconds: the longest a test waits for a server or a call


def _serve(port: int = 0):
    handle = start_server({"net": tiny.tiny_net()}, host="127.0.0.1", port=port)
    assert handle.wait_ready(timeout=180)
    return handle


@pytest.fixture
def first(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr(CONFIG.APP, "DISPLAY", False)
    handle = _serve()
    monkeypatch.setattr(CONFIG.API, "_host", handle.address)
    monkeypatch.setattr(CONFIG.API, "_api_key", None)
    yield handle
    handle.stop(grace=0)
    close_all()


def _remote_layer1(rnet: NNsight, x: torch.Tensor) -> torch.Tensor:
    with rnet.trace(x, remote=True, model_name="net"):
        out = rnet.layer1.output.save()
    return out


def test_an_existing_client_works_again_once_the_server_is_back(first):
    net, rnet = NNsight(tiny.tiny_net()), NNsight(tiny.tiny_net())
    x = torch.rand(1, 5)
    with net.trace(x):
        expected = net.layer1.output.save()
    assert torch.equal(_remote_layer1(rnet, x), expected)
    first.stop(grace=0)
    outcome: dict = {}

    def call_while_down() -> None:  # started while no server listens: waits for the channel, then runs
        try:
            outcome["value"] = _remote_layer1(rnet, x)
        except BaseException as error:  # reported by the assertion below
            outcome["error"] = error

    caller = threading.Thread(target=call_while_down)
    caller.start()
    second = _serve(first.port)
    try:
        caller.join(WAIT)
        assert not caller.is_alive() and "error" not in outcome, outcome.get("error")
        assert torch.equal(outcome["value"], expected)
        assert torch.equal(_remote_layer1(rnet, x), expected)  # and the same client object again
    finally:
        second.stop(grace=0)


def _submitted(rnet: NNsight, x: torch.Tensor) -> str:
    with rnet.trace(x, remote=True, model_name="net", blocking=False) as tracer:
        rnet.layer1.output.save()
    return tracer.job_id


def test_errors_about_a_job_the_old_server_accepted_name_it(first):
    rnet, x = NNsight(tiny.tiny_net()), torch.rand(1, 5)
    job_id = _submitted(rnet, x)
    RemoteBackend(job_id=job_id).result(timeout=WAIT)
    first.stop(grace=0)
    second = _serve(first.port)  # a new server: the old one's jobs are gone
    try:
        for fetch in (lambda: RemoteBackend(job_id=job_id).result(timeout=WAIT),
                      lambda: RemoteBackend(job_id=job_id).status(),
                      lambda: asyncio.run(aio.fetch(job_id, timeout=WAIT))):
            with pytest.raises(tether.RemoteError) as info:
                fetch()
            assert job_id in str(info.value) and "RemoteBackend(job_id=" in str(info.value), str(info.value)
    finally:
        second.stop(grace=0)


def test_a_model_kept_in_the_server_process_runs_in_a_worker_thread(monkeypatch):
    """isolate=False (and models that cannot be sent to a process) run on a worker thread: same protocol."""
    monkeypatch.setattr(CONFIG.APP, "DISPLAY", False)
    net, rnet, x = NNsight(tiny.tiny_net()), NNsight(tiny.tiny_net()), torch.rand(1, 5)
    with net.trace(x):
        expected = net.layer1.output.save()
    with start_server({"net": tiny.tiny_net()}, host="127.0.0.1", port=0, isolate=False) as handle:
        assert handle.wait_ready(timeout=WAIT) and handle.hub.queues["net"].replicas[0].process is None
        with rnet.trace(x, remote=True, model_name="net", backend=handle.address):
            out = rnet.layer1.output.save()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("isolate", [True, False])
def test_a_stopped_server_closes_its_ends_of_its_workers_pipes(monkeypatch, isolate):
    """Each stop (an evict, a server's end) gives back the front door's file descriptors of the worker's pipes:
    a server that hosts and evicts models for days must not run out of them."""
    monkeypatch.setattr(CONFIG.APP, "DISPLAY", False)
    with start_server({"net": tiny.tiny_net()}, host="127.0.0.1", port=0, isolate=isolate) as handle:
        assert handle.wait_ready(timeout=180)
        replica = handle.hub.queues["net"].replicas[0]
        assert not replica.conn.closed
    assert replica.conn.closed


def test_a_replica_whose_idle_worker_died_restarts_it_and_the_other_never_notices(monkeypatch):
    monkeypatch.setattr(CONFIG.APP, "DISPLAY", False)
    net, rnet, x = NNsight(tiny.tiny_net()), NNsight(tiny.tiny_net()), torch.rand(1, 5)
    with net.trace(x):
        expected = net.layer1.output.save()
    with start_server({"net": tiny.tiny_net()}, host="127.0.0.1", port=0, replicas=2) as handle:
        assert handle.wait_ready(timeout=180)
        first, second = handle.hub.queues["net"].replicas
        dead, other = first.worker_pid(), second.worker_pid()
        os.kill(dead, signal.SIGKILL)
        first.process.join(WAIT)  # dead (as a worker the kernel's OOM killer took while idle)
        for _ in range(4):  # whichever replica takes them, every job runs
            with rnet.trace(x, remote=True, model_name="net", backend=handle.address):
                out = rnet.layer1.output.save()
            assert torch.equal(out, expected)
        assert second.worker_pid() == other


def _slow_job(rnet: NNsight, x: torch.Tensor, **options) -> None:
    with rnet.trace(x, remote=True, model_name="net", **options):
        total = 0
        for i in range(30_000_000):  # pure Python for seconds: the job still runs when its server goes
            total += i
        rnet.layer1.output.save()


@pytest.mark.parametrize("mode", ["blocking", "asyncio"])
def test_a_server_lost_while_a_short_job_waits_in_its_submit_names_the_job(first, mode, monkeypatch):
    """Within SubmitJob's wait (a job without local() blocks, in its first second) the answer is lost with the
    server: the id the server sent in the call's initial metadata names it in the error."""
    monkeypatch.setattr(service, "QUIET_WAIT", 0.0)  # (named at once: no wait for the job to run 50 ms)
    rnet, x = NNsight(tiny.tiny_net()), torch.rand(1, 5)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            if mode == "blocking":
                _slow_job(rnet, x)
            else:
                backend = aio.AsyncBackend()
                _slow_job(rnet, x, backend=backend)
                asyncio.run(backend.run())
        except BaseException as error:  # asserted below
            errors.append(error)

    caller = threading.Thread(target=run)
    caller.start()
    deadline = time.monotonic() + WAIT
    while not [j for j in first.hub.store.jobs() if j.state == jobs_pb2.JOB_STATE_RUNNING]:
        assert time.monotonic() < deadline and caller.is_alive(), errors
        time.sleep(0.01)
    (job,) = first.hub.store.jobs()
    first.stop(grace=0)
    second = _serve(first.port)  # the client re-attaches there, and learns the job is gone with the old one
    try:
        caller.join(WAIT)
        assert not caller.is_alive() and len(errors) == 1
        assert isinstance(errors[0], tether.RemoteError), repr(errors[0])
        assert job.id in str(errors[0]) and "RemoteBackend(job_id=" in str(errors[0]), str(errors[0])
    finally:
        second.stop(grace=0)
