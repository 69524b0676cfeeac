"""Replicas as Ray actors (`tether serve --ray`) on a real Ray cluster that this module starts on loopback
(`ray.cluster_utils.Cluster`, head bound to 127.0.0.1) and stops after: the same client code gives the same
bits against the embedded server, the cluster and a local run; an actor that dies fails only its job.

Slow (a Ray head takes ~10 s to start on a busy machine): deselect with -m 'not slow'.
"""

from __future__ import annotations

import os
import signal
import socket

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray's addresses on loopback

import pytest
import torch
from test_operator_cli import _tether
from test_server import QUICK, Client, Outcome, events_of, program, spec
from test_server_cli import READY, START_TIMEOUT, _serve

from tether import CONFIG, LanguageModel
from tether.client.channel import close_all
from tether.runtime import tiny
from tether.server.app import start_server
from tether.v1 import jobs_pb2

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on 127.0.0.1 (a head with 2 logical CPUs and a worker node with 2; no dashboard, small
    object stores), this process connected: replicas may land on either node."""
    from ray.cluster_utils import Cluster

    head = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.1", "num_cpus": 2, "include_dashboard": False,
        "object_store_memory": 100 << 20})
    head.add_node(node_ip_address="127.0.0.1", num_cpus=2, object_store_memory=100 << 20)
    ray.init(address=head.address, log_to_driver=False)
    head.wait_for_nodes()
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    yield head
    ray.shutdown()
    head.shutdown()


def _start(**options):
    handle = start_server({"tiny": tiny.tiny_gpt2()}, host="127.0.0.1", port=0, **options)
    assert handle.wait_ready(timeout=180), "the server's workers did not start"
    return handle


@pytest.fixture(scope="module")
def on_ray(cluster):
    """A front door whose replicas (two) are actors on the cluster, each running one job at a time (the crash
    test places one looping job on each replica: batching would put them in one run)."""
    handle = _start(ray=cluster.address, replicas=2, max_batch=1)
    yield handle
    handle.stop(grace=0)
    close_all()


@pytest.fixture(scope="module")
def embedded():
    """The same model served by local worker processes."""
    handle = _start()
    yield handle
    handle.stop(grace=0)
    close_all()


def _run(model: LanguageModel, remote: bool):
    """One trace with a local() block that edits an activation, and a result over 1 MiB (the object store)."""
    offset = torch.linspace(-1, 1, 64)
    with model.trace(PROMPT, remote=remote) as tracer:
        mlp = model.transformer.h[0].mlp.output
        with tracer.local():
            edited = mlp * 2 + offset
        model.transformer.h[0].mlp.output = edited
        big = model.transformer.h[1].output.repeat(1, 600, 1).save()  # ~1.5 MiB
        logits = model.lm_head.output.save()
    return logits, big


def test_the_same_client_code_on_the_embedded_server_and_the_cluster_equals_a_local_run(
        on_ray, embedded, monkeypatch, tmp_path):
    model, tok = tiny.tiny_gpt2()
    logits, big = _run(LanguageModel(model, tokenizer=tok), remote=False)
    assert big.numel() * 4 > 1 << 20
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setattr(CONFIG.API, "_api_key", None)
    for server in (embedded, on_ray):
        monkeypatch.setattr(CONFIG.API, "_host", server.address)  # the only change between the two
        r_logits, r_big = _run(LanguageModel("tiny"), remote=True)
        assert torch.equal(r_logits, logits) and torch.equal(r_big, big), server.address


def _until_log(client: Client, job_id: str) -> tuple:
    """The job's event stream once it printed, and the worker it was dispatched to (from DISPATCHED's message)."""
    watch = (e for r in client.watch(job_id) for e in events_of(r))
    seen = [next(watch)]
    while seen[-1].WhichOneof("event") != "log":
        seen.append(next(watch))
    worker = next(e.status.message for e in seen if e.WhichOneof("event") == "status"
                  and e.status.state == jobs_pb2.JOB_STATE_DISPATCHED)
    return seen, watch, worker


def test_an_actor_that_dies_fails_its_job_and_queued_jobs_run_once(on_ray):
    replicas = on_ray.hub.queues["tiny"].replicas
    client = Client(on_ray.address)
    try:
        source = 'print("started")\nwhile True:\n    pass\n'
        looping = [client.submit(spec(program(source, "hello"))).job_id for _ in range(2)]  # one on each replica
        queued = [client.submit(spec(QUICK)).job_id for _ in range(3)]
        watches = {job_id: _until_log(client, job_id) for job_id in looping}
        pids = [r.worker_pid(10) for r in replicas]
        victim = next(j for j in looping if "tiny-0" in watches[j][2])
        other = next(j for j in looping if j != victim)
        os.kill(pids[0], signal.SIGKILL)  # the actor's process dies, as in a segfault or an OOM kill
        crashed = Outcome(watches[victim][0] + list(watches[victim][1]))
        assert crashed.final.state == jobs_pb2.JOB_STATE_ERROR, crashed.final
        for words in ("crashed", "Ray actor died", "running the program", "'started'"):
            assert words in crashed.final.message, crashed.final.message
        assert crashed.states.count(jobs_pb2.JOB_STATE_RUNNING) == 1
        client.cancel(other)
        assert Outcome(list(watches[other][1])).final.state == jobs_pb2.JOB_STATE_CANCELLED
        for job_id in queued:
            outcome = client.wait(job_id)
            assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
            assert outcome.states.count(jobs_pb2.JOB_STATE_RUNNING) == 1  # nothing ran twice
        assert replicas[0].restarts == 1 and replicas[0].worker_pid(10) != pids[0]
        assert replicas[1].restarts == 0 and replicas[1].worker_pid(10) == pids[1]
    finally:
        client.close()


def _actors(prefix: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def test_the_readme_walkthrough_serve_deploy_models_and_a_remote_job(cluster, monkeypatch, tmp_path):
    """`tether serve --ray auto --model tiny=tiny` -> `tether deploy net=...` -> `tether models` -> a job from
    this (another) process: each replica an actor on the cluster, the job equal to a local run."""
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)  # what `ray start` leaves for `auto` to find
    proc, lines = _serve("--ray", "auto", "--model", "tiny=tiny", "--port", "0")
    try:
        line = lines.get(timeout=START_TIMEOUT)
        assert line is not None, proc.stderr.read()
        match = READY.match(line.rstrip("\n"))
        assert match, line
        address = f"127.0.0.1:{match.group(1)}"
        done = _tether("deploy", "--host", address, "net=tether.runtime.tiny:tiny_net")
        assert done.returncode == 0, done.stderr
        done = _tether("models", "--host", address)
        assert done.returncode == 0, done.stderr
        rows = [row.split()[:3] for row in done.stdout.splitlines()[1:]]
        assert rows == [["net", "ready", "1"], ["tiny", "ready", "1"]], done.stdout
        ours = f"tether/{proc.pid}@"  # the actors of this front door
        assert sorted(n.split("/")[2] for n in _actors(ours)) == ["net-0", "tiny-0"]
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
        monkeypatch.setattr(CONFIG.API, "_host", address)
        monkeypatch.setattr(CONFIG.API, "_api_key", None)
        model, tok = tiny.tiny_gpt2()
        local, remote = LanguageModel(model, tokenizer=tok), LanguageModel("tiny")
        with local.trace(PROMPT):
            expected = local.lm_head.output.save()
        with remote.trace(PROMPT, remote=True):
            got = remote.lm_head.output.save()
        assert torch.equal(got, expected)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        close_all()


def test_an_address_where_no_ray_head_answers_fails_at_once_with_the_fix():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc, lines = _serve("--ray", f"127.0.0.1:{port}", "--model", "tiny=tiny", "--port", "0")
    try:
        assert proc.wait(timeout=START_TIMEOUT) == 1
        error = proc.stderr.read()
        assert f"no Ray head answers at 127.0.0.1:{port}" in error and "ray start --head" in error, error
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
