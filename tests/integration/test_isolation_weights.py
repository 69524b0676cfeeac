"""Weights of any size reach a worker process (one memfd, not a file descriptor per tensor), equal bit for bit to
a local run, again after the worker is killed mid-job and restarted; a job that wrote into them changes
nothing for later jobs, even when its worker dies before the write is noticed."""

from __future__ import annotations

import logging
import os
import signal

import pytest
import shipped_models
import torch
from test_isolation import _watch_until_log
from test_server import WAIT, Client, Outcome, program, spec

from tether import CONFIG, LanguageModel, NNsight, RemoteError
from tether.server.app import start_server
from tether.v1 import jobs_pb2, values_pb2

SERVER_OPTIONS = {"max_batch": 1, "sources": {"many": shipped_models.many_tensors}}
MANY = values_pb2.Value(model_reference=values_pb2.ModelReference(name="many"))
IDS = torch.tensor([[1, 5, 7, 30, 2]])


def served() -> dict:
    return {"many": shipped_models.many_tensors()}


@pytest.fixture
def client(server, monkeypatch):
    monkeypatch.setattr(CONFIG.APP, "DISPLAY", False)
    c = Client(server.address)
    yield c
    c.close()


def _run(net: NNsight, **remote) -> dict[str, torch.Tensor]:
    """The code compared: run locally, or remotely with `remote=True, model_name=..., backend=...`."""
    with net.trace(IDS, **remote):
        hidden = net.layers[150].output.save()
        gated = net.gate.clone().save()
        out = net.output.save()
    return {"hidden": hidden, "gated": gated, "out": out}


def _assert_remote_equals_local(server) -> None:
    local = _run(NNsight(shipped_models.many_tensors()))
    remote = _run(NNsight(shipped_models.many_tensors()), remote=True, model_name="many", backend=server.address)
    for name, value in local.items():
        assert remote[name].dtype == value.dtype and torch.equal(remote[name], value), name


def _replica(server):
    return server.hub.queues["many"].replicas[0]


def _kill_mid_job(server, client: Client, source: str) -> int:
    """SIGKILL the worker while `source` (which prints a line, then loops) runs; the new worker's pid."""
    pid = _replica(server).worker_pid(timeout=WAIT)
    job_id = client.submit(spec(program(source, IDS, model="many", bindings={"model": MANY}))).job_id
    watch = _watch_until_log(client, job_id)
    os.kill(pid, signal.SIGKILL)
    final = Outcome(list(watch)).final
    assert final.state == jobs_pb2.JOB_STATE_ERROR and "SIGKILL" in final.failure.message, final
    restarted = _replica(server).worker_pid(timeout=WAIT)  # (ready again: the relay restarts it at once)
    assert restarted is not None and restarted != pid
    return restarted


LOOP = """
print("running")
while True:
    pass
"""

WRITE_THEN_LOOP = """
with torch.no_grad():
    model.head.weight.mul_(0)  # the embeddings too: they are tied
    model.layers[150].bias.add_(1)
    model.gate.fill_(3)
print("written")
while True:
    pass
"""


def test_a_model_of_600_tensors_runs_in_its_own_process_bit_equal_to_local(server, client):
    replica, front = _replica(server), server.hub.queues["many"].hosted.module  # the front door's own module
    pid = replica.worker_pid(timeout=WAIT)
    assert replica.process is not None and replica.process.is_alive() and pid not in (None, os.getpid())
    assert len(list(front.parameters())) + len(list(front.buffers())) >= 600
    assert len(os.listdir(f"/proc/{pid}/fd")) < 64  # not a descriptor per tensor
    with open("/proc/self/maps") as maps:  # the front door's own tensors are the memfd's pages: no second copy
        regions = [line.split()[0].split("-") for line in maps if "memfd:tether-weights-many-0" in line]
    address = front.layers[299].weight.data_ptr()
    assert any(int(start, 16) <= address < int(end, 16) for start, end in regions)
    _assert_remote_equals_local(server)


def test_tied_weights_views_and_buffers_are_as_served_in_the_worker(server, client):
    source = """
    tied = model.head.weight is model.embed.weight
    out = (tied, model.mixer.stride(), model.mixer.is_contiguous(), model.frozen.requires_grad,
           model.embed.weight.requires_grad, model.gate.dtype, "shift" in model._non_persistent_buffers_set,
           model.shift.clone(), model.scale.clone()).save()
    """
    outcome = client.run(spec(program(source, IDS, model="many", bindings={"model": MANY})))
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    *flags, shift, scale = outcome.saved()["out"]
    reference = shipped_models.many_tensors()
    assert flags == [True, (1, 8), False, False, True, torch.bfloat16, True]
    assert torch.equal(shift, reference.shift) and torch.equal(scale, reference.scale)


def test_results_stay_bit_equal_after_the_worker_is_killed_and_restarted_twice(server, client):
    _assert_remote_equals_local(server)
    for _ in range(2):
        _kill_mid_job(server, client, LOOP)
        _assert_remote_equals_local(server)


def test_a_write_into_the_weights_is_gone_when_its_worker_is_killed_before_it_is_noticed(server, client):
    _kill_mid_job(server, client, WRITE_THEN_LOOP)  # the worker's pages were private: the shared ones unchanged
    _assert_remote_equals_local(server)


def test_a_write_into_the_weights_is_put_back_before_the_next_job(server, client):
    net = NNsight(shipped_models.many_tensors())
    with pytest.raises(RemoteError, match="weights in place"):
        with net.trace(IDS, remote=True, model_name="many", backend=server.address):
            with torch.no_grad():
                net.head.weight.mul_(0)
            net.output.save()
    _assert_remote_equals_local(server)


def test_every_replica_has_the_weights_as_served(monkeypatch):
    """Replica 1 is a deep copy of replica 0, made while replica 0's worker starts: the copy must never read a
    storage while it moves into shared memory (it once read freed memory: values like 1e32 in a layer)."""
    monkeypatch.setattr(CONFIG.APP, "DISPLAY", False)
    reference = shipped_models.many_tensors().state_dict()
    with start_server({"many": shipped_models.many_tensors()}, host="127.0.0.1", port=0, replicas=2,
                      max_batch=1) as handle:
        assert handle.wait_ready(timeout=WAIT)
        for replica in handle.hub.queues["many"].replicas:
            assert replica.process is not None
            served = replica._payload.state_dict()
            assert all(torch.equal(served[name], value) for name, value in reference.items()), replica.name
        _assert_remote_equals_local(handle)


def test_a_model_that_cannot_be_pickled_is_served_from_a_thread_with_a_loud_warning(caplog, monkeypatch):
    monkeypatch.setattr(CONFIG.APP, "DISPLAY", False)
    x, locked = torch.ones(1, 4), shipped_models.Unpicklable()
    with torch.no_grad():
        expected = locked(x)
    with caplog.at_level(logging.WARNING, logger="tether.server"):
        with start_server({"locked": locked}, host="127.0.0.1", port=0) as handle:
            assert handle.wait_ready(timeout=WAIT) and handle.hub.queues["locked"].replicas[0].process is None
            net = NNsight(shipped_models.Unpicklable())
            with net.trace(x, remote=True, model_name="locked", backend=handle.address):
                out = net.output.save()
    assert "WITHOUT ISOLATION" in caplog.text and "locked" in caplog.text
    assert torch.equal(out, expected)


@pytest.mark.slow
def test_smollm2_is_served_in_its_own_worker_process(smollm2, monkeypatch):
    monkeypatch.setattr(CONFIG.APP, "DISPLAY", False)
    model, tokenizer = smollm2
    local = LanguageModel(model, tokenizer=tokenizer)
    with local.trace("The Eiffel Tower is in"):
        expected = local.lm_head.output.save()
    with start_server({"smol": smollm2}, host="127.0.0.1", port=0) as handle:
        assert handle.wait_ready(timeout=180)
        replica = handle.hub.queues["smol"].replicas[0]
        pid = replica.worker_pid(timeout=WAIT)
        assert replica.process is not None and replica.process.is_alive() and pid not in (None, os.getpid())
        with local.trace("The Eiffel Tower is in", remote=True, model_name="smol", backend=handle.address):
            logits = local.lm_head.output.save()
    assert torch.equal(logits, expected)
