"""Replicas as Ray actors (`tether serve --ray`) on a real Ray cluster that this module starts on loopback
(`ray.cluster_utils.Cluster`, head bound to 127.0.0.1) and stops after: the same client code gives the same
bits against the embedded server, the cluster and a local run; an actor that dies fails only its job; two
front doors serve the same models and jobs, and a job outlives the door it was submitted to.

Slow (a Ray head takes ~10 s to start on a busy machine): deselect with -m 'not slow'.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import threading
import uuid
import weakref

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray's addresses on loopback

import grpc
import pytest
import torch
from test_operator_cli import _tether
from test_server import (
    LOCAL,
    QUICK,
    QUICK_SOURCE,
    Client,
    Outcome,
    code_of,
    events_of,
    local_run,
    program,
    spec,
    value_map,
)
from test_server_cli import READY, START_TIMEOUT, _port, _serve

from tether import CONFIG, LanguageModel, tiny
from tether.client import RemoteBackend
from tether.client.channel import close_all
from tether.placement_options import Placement
from tether.server.app import start_server
from tether.server.cluster import shut_down
from tether.server.deployments import FAILED
from tether.v1 import jobs_pb2, values_pb2

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
    handle = _start(ray=cluster.address, ray_namespace="on-ray", replicas=2, max_batch=1)
    yield handle
    handle.stop(grace=0)
    shut_down("on-ray")  # the cluster's part: its core and replica actors
    close_all()


@pytest.fixture(scope="module")
def embedded():
    """The same model served by local worker processes."""
    handle = _start()
    yield handle
    handle.stop(grace=0)
    close_all()


def _run(model: LanguageModel, remote: bool):
    """One trace with a local() block that edits an activation, one whose values the job does not read (it goes
    on meanwhile), and a result over 1 MiB (the object store)."""
    offset = torch.linspace(-1, 1, 64)
    seen = []
    with model.trace(PROMPT, remote=remote) as tracer:
        mlp = model.transformer.h[0].mlp.output
        with tracer.local():
            edited = mlp * 2 + offset
        model.transformer.h[0].mlp.output = edited
        hidden = model.transformer.h[1].output
        with tracer.local():
            seen.append(hidden.sum())
        big = hidden.repeat(1, 600, 1).save()  # ~1.5 MiB
        logits = model.lm_head.output.save()
    assert len(seen) == 1 and torch.equal(seen[0], big[:, : big.shape[1] // 600].sum())
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


def test_without_lanes_ray_calls_carry_the_same_jobs(cluster, monkeypatch, tmp_path):
    """Where no lane can be opened (here: asked for), the messages go by Ray calls: the same bits."""
    model, tok = tiny.tiny_gpt2()
    logits, big = _run(LanguageModel(model, tokenizer=tok), remote=False)
    handle = _start(ray=cluster.address, ray_namespace="no-lanes", ray_lanes=False)
    try:
        assert not handle.hub.store._core.lanes
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
        monkeypatch.setattr(CONFIG.API, "_api_key", None)
        monkeypatch.setattr(CONFIG.API, "_host", handle.address)
        r_logits, r_big = _run(LanguageModel("tiny"), remote=True)
        assert torch.equal(r_logits, logits) and torch.equal(r_big, big)
    finally:
        handle.stop(grace=0)
        shut_down("no-lanes")
        close_all()


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


def _stop(door) -> None:
    """Stop a `tether serve` the way an operator does (SIGTERM); it exits cleanly."""
    door.send_signal(signal.SIGTERM)
    assert door.wait(timeout=60) == 0, door.stderr.read()


def test_the_readme_walkthrough_serve_deploy_models_and_a_remote_job(cluster, monkeypatch, tmp_path):
    """`tether serve --ray auto --model tiny=tiny` -> `tether deploy net=...` -> `tether models` -> a job from
    this (another) process -> a second front door (`tether serve --ray auto`, no --model) with the same models:
    each replica an actor on the cluster, the jobs equal to a local run."""
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)  # what `ray start` leaves for `auto` to find
    proc, lines = _serve("--ray", "auto", "--model", "tiny=tiny", "--port", "0")
    started = [proc]
    try:
        line = lines.get(timeout=START_TIMEOUT)
        assert line is not None, proc.stderr.read()
        match = READY.match(line.rstrip("\n"))
        assert match, line
        address = f"127.0.0.1:{match.group(1)}"
        done = _tether("deploy", "--host", address, "net=tether.tiny:tiny_net")
        assert done.returncode == 0, done.stderr
        done = _tether("models", "--host", address)
        assert done.returncode == 0, done.stderr
        rows = [row.split()[:3] for row in done.stdout.splitlines()[1:]]
        assert rows == [["net", "ready", "1"], ["tiny", "ready", "1"]], done.stdout
        assert sorted(n.split("/")[2] for n in _actors("tether/tether/")) == ["net-0", "tiny-0"]  # (namespace)
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
        second, lines = _serve("--ray", "auto", "--port", "0")  # a second front door: no --model
        started.append(second)
        other = f"127.0.0.1:{_port(second, lines)}"
        done = _tether("models", "--host", other)
        assert done.returncode == 0, done.stderr
        assert [row.split()[:3] for row in done.stdout.splitlines()[1:]] == rows, done.stdout
        monkeypatch.setattr(CONFIG.API, "_host", other)
        with remote.trace(PROMPT, remote=True):
            got = remote.lm_head.output.save()
        assert torch.equal(got, expected)
        for door in started:
            _stop(door)
    finally:
        for door in started:
            if door.poll() is None:
                door.kill()
                door.wait()
        shut_down("tether")
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


# ---- several front doors ------------------------------------------------------------------------------
DOORS = "doors"  # the namespace of the two front doors below (their core and actors)
LOOPING = program('print("started")\nwhile True:\n    pass\n', "hello")


def _door(cluster, doors: dict, *args: str) -> str:
    """Start door A, `tether serve --ray ADDRESS` (in the DOORS namespace), as a process; its address."""
    proc, lines = _serve("--ray", cluster.address, "--ray-namespace", DOORS, "--port", "0", *args)
    doors["a"] = proc
    doors["a_address"] = address = f"127.0.0.1:{_port(proc, lines)}"
    return address


@pytest.fixture(scope="module")
def doors(cluster):
    """Two front doors: A, a process, hosts tiny (one replica running one job at a time); B, in this process,
    joins with no model (as `tether serve --ray ADDRESS` does; the walkthrough runs that command). Both are
    stopped after (A by its pid), then the cluster's part of them."""
    started: dict = {}
    door_b = None
    try:
        _door(cluster, started, "--model", "tiny=tiny", "--max-batch", "1")
        door_b = start_server({}, host="127.0.0.1", port=0, ray=cluster.address, ray_namespace=DOORS)
        started["b_address"] = door_b.address
        yield started
    finally:
        if door_b is not None:
            door_b.stop(grace=0)
        if "a" in started and started["a"].poll() is None:
            started["a"].kill()
            started["a"].wait()
        shut_down(DOORS)
        close_all()


def test_a_second_door_serves_the_clusters_models_and_the_jobs_submitted_through_the_first(
        doors, monkeypatch, tmp_path):
    a, b = doors["a_address"], doors["b_address"]
    for address in (a, b):
        done = _tether("models", "--host", address)
        assert done.returncode == 0, done.stderr
        assert [row.split()[:3] for row in done.stdout.splitlines()[1:]] == [["tiny", "ready", "1"]], done.stdout
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setattr(CONFIG.API, "_api_key", None)
    model, tok = tiny.tiny_gpt2()
    local = LanguageModel(model, tokenizer=tok)
    with local.trace(PROMPT):
        expected = local.lm_head.output.save()
    monkeypatch.setattr(CONFIG.API, "_host", a)
    remote = LanguageModel("tiny")
    submitted = []
    for _ in range(2):
        with remote.trace(PROMPT, remote=True, blocking=False) as tracer:
            out = remote.lm_head.output.save()
        submitted.append(tracer.job_id)
    monkeypatch.setattr(CONFIG.API, "_host", b)  # the only change: the rest goes through door B
    assert torch.equal(RemoteBackend(job_id=submitted[0]).result(timeout=120)["out"], expected)
    with remote.trace(PROMPT, remote=True, backend=RemoteBackend(job_id=submitted[1])):  # re-attached
        out = remote.lm_head.output.save()
    assert torch.equal(out, expected)
    logits, big = _run(local, remote=False)
    for address in (a, b):  # local() blocks answered through either door; a result over 1 MiB
        monkeypatch.setattr(CONFIG.API, "_host", address)
        r_logits, r_big = _run(LanguageModel("tiny"), remote=True)
        assert torch.equal(r_logits, logits) and torch.equal(r_big, big), address


def test_a_job_submitted_through_one_door_is_watched_and_cancelled_through_the_other(doors):
    via_a, via_b = Client(doors["a_address"]), Client(doors["b_address"])
    try:
        job_id = via_a.submit(spec(LOOPING)).job_id
        seen, rest, _ = _until_log(via_b, job_id)
        listed = _tether("jobs", "--host", doors["b_address"])  # everyone's jobs, through either door
        assert listed.returncode == 0 and job_id in listed.stdout, listed.stdout + listed.stderr
        assert via_b.cancel(job_id) == jobs_pb2.JOB_STATE_CANCELLED
        assert Outcome(seen + list(rest)).final.state == jobs_pb2.JOB_STATE_CANCELLED
        assert via_a.wait(job_id).final.state == jobs_pb2.JOB_STATE_CANCELLED
    finally:
        via_a.close()
        via_b.close()


def test_a_run_job_stream_re_attached_through_the_other_door_answers_the_local_call(doors):
    """A RunJob through door A waits for its local() answer; the client re-attaches through door B (RunJob,
    the same request_id), is replayed the call and answers it there; the job ends as a local run does."""
    via_a, via_b = Client(doors["a_address"]), Client(doors["b_address"])
    job = spec(program(LOCAL, "hello world"), request_id=str(uuid.uuid4()))
    first = via_a.stream(job)
    try:
        asked = first.until(lambda e: e.WhichOneof("event") == "local_call")
        outcome = via_b.stream(job).finish(lambda block_id, reads: {"scale": reads["h"].abs().mean().item() + 1.0})
    finally:
        first.close()
        via_a.close()
        via_b.close()
    assert {e.job_id for e in outcome.events} == {asked.job_id}  # the same job: re-attached, not submitted again
    assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    local = local_run(LOCAL, "hello world")
    assert torch.equal(outcome.saved()["logits"], local["logits"].as_subclass(torch.Tensor))


def test_jobs_outlive_the_door_they_were_submitted_to(cluster, doors):
    """Door A stops while one of its jobs runs and another waits behind it; door B serves both (cancels the
    first, reads the second's result), and door A started again reads it too."""
    via_a, via_b = Client(doors["a_address"]), Client(doors["b_address"])
    try:
        running = via_a.submit(spec(LOOPING)).job_id
        queued = via_a.submit(spec(QUICK)).job_id  # (one replica, one job at a time: it waits)
        _until_log(via_a, running)
        via_a.close()
        _stop(doors["a"])
        assert via_b.get(running).status.state == jobs_pb2.JOB_STATE_RUNNING
        assert via_b.get(queued).status.state == jobs_pb2.JOB_STATE_QUEUED
        via_b.cancel(running)
        assert via_b.wait(queued).final.state == jobs_pb2.JOB_STATE_COMPLETED
        expected = local_run(QUICK_SOURCE, "hello")["out"]
        assert torch.equal(value_map(via_b.read_result(queued))["out"], expected)
        via_a = Client(_door(cluster, doors, "--model", "tiny=tiny", "--max-batch", "1"))  # as before
        assert torch.equal(value_map(via_a.read_result(queued))["out"], expected)
        assert via_a.wait(running).final.state == jobs_pb2.JOB_STATE_CANCELLED
        done = _tether("evict", "--host", doors["b_address"], "tiny")  # the cluster's tiny, through door B
        assert done.returncode == 0, done.stderr
        assert _actors(f"tether/{DOORS}/") == []  # its actor was killed
        done = _tether("models", "--host", doors["a_address"])
        assert done.returncode == 0 and done.stdout.splitlines()[1:] == [], done.stdout
    finally:
        via_a.close()
        via_b.close()


# ---- a deploy as every front door sees it --------------------------------------------------------------
DEPLOYING = "deploying"  # the namespace of the two doors below
WAIT = 60.0  # s: the longest a test waits for a door or a load


@pytest.fixture
def two_doors(cluster):
    """Two front doors of one namespace, in this process (so a load can be held by the test), no models yet;
    stopped after, then the cluster's part of them."""
    started = []
    try:
        for _ in range(2):
            started.append(start_server({}, host="127.0.0.1", port=0, ray=cluster.address,
                                        ray_namespace=DEPLOYING, max_batch=1))
        yield started
    finally:
        for door in started:
            door.stop(grace=0)
        shut_down(DEPLOYING)
        close_all()


def _held(gate: threading.Event, error: str = "", made: list | None = None):
    """A model source whose load waits for the test to open `gate`, then gives tiny (or raises `error`); a weak
    reference to each module it gives is added to `made`."""
    def load():
        assert gate.wait(WAIT), "the test never released the load"
        if error:
            raise RuntimeError(error)
        model, tokenizer = tiny.tiny_gpt2()
        if made is not None:
            made.append(weakref.ref(model))
        return model, tokenizer
    return load


def _listed(address: str) -> list[dict]:
    """`tether models --host ADDRESS --json`: each model's row."""
    done = _tether("models", "--host", address, "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _on(name: str):
    """QUICK's program, run on model `name`."""
    bound = values_pb2.Value(model_reference=values_pb2.ModelReference(name=name))
    return spec(program(QUICK_SOURCE, "hello", model=name, bindings={"model": bound}))


def _deploy(door, name: str, load) -> None:
    door.hub.models.deploy(name, load, spec="tiny (held by the test)", placement=Placement())


def _states(address: str) -> list[tuple[str, str]]:
    return [(row["name"], row["state"]) for row in _listed(address)]


def test_a_model_loading_in_one_door_is_listed_and_waited_for_by_the_other(two_doors):
    """Door A deploys `slow` (its load held by the test): door B lists it as loading, refuses a job for it
    with "still loading" when told not to wait, and holds one that may wait until it is ready; the result
    equals a local run. Neither door keeps the weights then: only the structure (the replicas run it); the
    loading door's full copy is freed."""
    a, b = two_doors
    gate, made = threading.Event(), []
    slow = _on("slow")
    via_b = Client(b.address)
    try:
        _deploy(a, "slow", _held(gate, made=made))
        for door in (a, b):
            row, = _listed(door.address)
            assert (row["name"], row["state"]) == ("slow", "loading") and "loading tiny" in row["message"], row
        b.hub.models.loading_wait = 0.0
        code, details = code_of(lambda: via_b.run(slow))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "'slow' is still loading" in details and "retry in a moment" in details, details
        b.hub.models.loading_wait = WAIT
        results = {}
        job = threading.Thread(target=lambda: results.update(outcome=via_b.run(slow)))
        job.start()
        gate.set()
        job.join(WAIT)
        outcome = results["outcome"]
        assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
        assert torch.equal(outcome.saved()["out"], local_run(QUICK_SOURCE, "hello")["out"])
        for door in (a, b):
            assert _states(door.address) == [("slow", "ready")]
            module = door.hub.registry.get("slow").module
            assert {t.device.type for t in (*module.parameters(), *module.buffers())} == {"meta"}
        gc.collect()
        assert len(made) == 1 and made[0]() is None
    finally:
        gate.set()
        via_b.close()


def test_a_load_that_fails_in_one_door_is_listed_failed_with_why_by_the_other(two_doors):
    """Door A's load of `broken` fails: a job waiting for it at door B is refused with the reason, both doors
    list it failed with the reason until it is evicted (through door B); a load evicted through door B while
    it runs in door A is dropped by A when it ends; door A stopped while it loads leaves it listed failed."""
    a, b = two_doors
    gate, other_gate, orphan_gate = threading.Event(), threading.Event(), threading.Event()
    via_b = Client(b.address)
    try:
        _deploy(a, "broken", _held(gate, error="the weights file is corrupt"))
        assert _states(b.address) == [("broken", "loading")]
        b.hub.models.loading_wait = WAIT
        results = {}
        job = threading.Thread(target=lambda: results.update(
            refused=code_of(lambda: via_b.run(_on("broken")))))
        job.start()
        gate.set()
        job.join(WAIT)
        code, details = results["refused"]
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "'broken' is not serving" in details and "the weights file is corrupt" in details, details
        for door in (a, b):
            row, = _listed(door.address)
            assert row["state"] == "failed" and "the weights file is corrupt" in row["message"], row
        done = _tether("evict", "--host", b.address, "broken")
        assert done.returncode == 0, done.stderr
        assert _states(a.address) == [] and _states(b.address) == []
        _deploy(a, "gone", _held(other_gate))
        assert _states(b.address) == [("gone", "loading")]
        done = _tether("evict", "--host", b.address, "gone")
        assert done.returncode == 0, done.stderr
        assert _states(a.address) == [] and _states(b.address) == []
        other_gate.set()
        assert a.hub.models.wait("gone", WAIT).state == FAILED  # (dropped, once its load ended)
        assert _states(a.address) == [] and _states(b.address) == []
        _deploy(a, "orphan", _held(orphan_gate))
        a.stop(grace=0)  # a door that stops while it loads: the load is listed failed, and never hosted
        row, = _listed(b.address)
        assert (row["name"], row["state"]) == ("orphan", "failed") and "stopped" in row["message"], row
        orphan_gate.set()
        a.hub.models.wait("orphan", WAIT)
        assert _states(b.address) == [("orphan", "failed")]
    finally:
        for released in (gate, other_gate, orphan_gate):
            released.set()
        via_b.close()


def test_a_models_rename_aliases_are_declared_by_every_door_of_the_cluster(cluster, monkeypatch, tmp_path):
    """A model hosted with `rename=` aliases: the door that deployed it and a door that joined later both
    declare them, so a client's mirror prints and names the modules as the local model does."""
    from test_rename import RENAME

    model, tok = tiny.tiny_gpt2()
    renamed = LanguageModel(model, tokenizer=tok, rename=RENAME)
    with renamed.trace(PROMPT):
        want = renamed.layers[0].attention.output[0].save()
    namespace = f"renames-{uuid.uuid4().hex[:8]}"
    first = later = None
    try:
        hosted, hosted_tok = tiny.tiny_gpt2()
        first = start_server({"tiny": LanguageModel(hosted, tokenizer=hosted_tok, rename=RENAME)}, host="127.0.0.1",
                             port=0, ray=cluster.address, ray_namespace=namespace)
        assert first.wait_ready(timeout=180), "the replica did not start"
        later = start_server({}, host="127.0.0.1", port=0, ray=cluster.address, ray_namespace=namespace)
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
        monkeypatch.setattr(CONFIG.API, "_api_key", None)
        for door in (first, later):
            monkeypatch.setattr(CONFIG.API, "_host", door.address)
            remote = LanguageModel("tiny")
            assert repr(remote) == repr(renamed), door.address
            with remote.trace(PROMPT, remote=True):
                got = remote.layers[0].attention.output[0].save()
            assert torch.equal(got, want), door.address
    finally:
        for door in (later, first):
            if door is not None:
                door.stop(grace=0)
        shut_down(namespace)
        close_all()
