"""Cross-job batching through a real loopback server: concurrent jobs share one batched run, and each gets
exactly what the same code gives when run alone locally (atol 1e-5 for activations, equal tokens).

The model's only worker is first held inside a `local()` block, so the jobs under test are all waiting when
it is free again and are taken together: which jobs share a batch never depends on timing.
"""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest
import torch

import tether
from tether import CONFIG, LanguageModel, tiny
from tether.client import RemoteBackend
from tether.server.app import start_server
from tether.server.auth import LOOPBACK_OWNER
from tether.v1 import jobs_pb2, jobs_pb2_grpc

SERVER_OPTIONS = {"local_call_timeout": 30.0}
PROMPTS = ["The quick brown fox jumps over the lazy", "Hi", "a b c", "Hello there, general"]


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2()}


pytestmark = pytest.mark.usefixtures("client_config")


def local_llm() -> LanguageModel:
    model, tokenizer = tiny.tiny_gpt2()
    return LanguageModel(model, tokenizer=tokenizer)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def until(condition, timeout: float = 30.0) -> None:
    """Wait for `condition()` to hold (polling), failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        threading.Event().wait(0.005)


@contextlib.contextmanager
def held_worker(server):
    """Keep the tiny model's worker busy in a local() block until the block of `with` ends."""
    entered, release = threading.Event(), threading.Event()
    llm = LanguageModel("tiny")

    def holder() -> None:
        with llm.trace("hold", remote=True):
            llm.lm_head.output.save()
            with tether.local():
                entered.set()
                release.wait(30)

    thread = threading.Thread(target=holder, name="holder")
    thread.start()
    try:
        assert entered.wait(30)
        yield server.hub.queues["tiny"]
    finally:
        release.set()
        thread.join(30)


def in_threads(server, fns: list) -> list:
    """Run each fn in its own thread once the worker is held; they are released together."""
    results: list = [None] * len(fns)
    errors: list = [None] * len(fns)

    def call(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as error:
            errors[i] = error

    threads = [threading.Thread(target=call, args=(i,), name=f"client-{i}") for i in range(len(fns))]
    with held_worker(server) as queue:
        for thread in threads:
            thread.start()
        until(lambda: queue.depth == len(fns))
    for thread in threads:
        thread.join(60)
    return [errors[i] or results[i] for i in range(len(fns))]


def batch_sizes(server, job_id: str) -> list[int]:
    """The batch_size of each status event of a finished job (WatchJob from the first event)."""
    with grpc.insecure_channel(server.address) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        sizes = []
        for response in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=30):
            for event in (response.event, *response.more_events):
                if event.WhichOneof("event") == "status":
                    sizes.append(event.status.batch_size)
                    if event.status.state in (jobs_pb2.JOB_STATE_COMPLETED, jobs_pb2.JOB_STATE_ERROR,
                                              jobs_pb2.JOB_STATE_CANCELLED):
                        return sizes
    return sizes


# ---- the jobs: different prompts, interventions and lengths --------------------------------------------
def zero_mlp(llm, prompt, n, backend=None):
    with llm.generate(prompt, max_new_tokens=n, remote=True, backend=backend):
        llm.transformer.h[0].mlp.output[:] = 0
        out = llm.generator.output.save()
    return {"out": out}


def per_step(llm, prompt, n, backend=None):
    with llm.generate(prompt, max_new_tokens=n, remote=True, backend=backend) as tracer:
        logits = list().save()
        with tracer.all():
            logits.append(llm.lm_head.output[0, -1])
        out = llm.generator.output.save()
    return {"out": out, "logits": torch.stack(logits)}


def scaled(llm, prompt, n, backend=None):
    with llm.generate(prompt, max_new_tokens=n, remote=True, backend=backend) as tracer:
        hidden = list().save()
        with tracer.all():
            llm.transformer.h[1].output[0][:] = llm.transformer.h[1].output[0] * 1.5
            hidden.append(llm.transformer.h[1].output[0][0, -1].clone())
        out = llm.generator.output.save()
    return {"out": out, "hidden": torch.stack(hidden)}


def with_local(llm, prompt, n, backend=None):
    seen = []
    with llm.generate(prompt, max_new_tokens=n, remote=True, backend=backend) as tracer:
        with tracer.all():
            token = llm.lm_head.output[0, -1].argmax(dim=-1)
            with tether.local():
                seen.append(int(token))
        out = llm.generator.output.save()
    return {"out": out, "seen": torch.tensor(seen)}


def _run_locally(fn, llm, prompt, n) -> dict:
    """`fn` run in this process on `llm` (its `remote=True` and `backend` dropped)."""
    original = llm.generate

    def local_generate(*args, remote=False, backend=None, **kwargs):
        return original(*args, **kwargs)

    object.__setattr__(llm, "generate", local_generate)
    return fn(llm, prompt, n)


CASES = [(zero_mlp, PROMPTS[0], 5), (per_step, PROMPTS[1], 3), (scaled, PROMPTS[2], 6), (with_local, PROMPTS[3], 4)]


def test_concurrent_generations_share_one_batch_and_get_their_solo_results(server, capsys):
    backends = [RemoteBackend(verbose=True) for _ in CASES]
    fns = [lambda fn=fn, p=p, n=n, b=b: fn(LanguageModel("tiny"), p, n, backend=b)
           for (fn, p, n), b in zip(CASES, backends)]
    results = in_threads(server, fns)
    for (fn, prompt, n), result, backend in zip(CASES, results, backends):
        assert not isinstance(result, BaseException), result
        expected = _run_locally(fn, local_llm(), prompt, n)
        assert torch.equal(result["out"], expected["out"]), fn.__name__
        assert result["out"].shape[1] == len(local_llm().tokenizer(prompt)["input_ids"]) + n
        for name in expected:
            close(result[name].float(), expected[name].float())
        assert max(batch_sizes(server, backend.last_job_id)) == len(CASES)
    assert f"batched with {len(CASES) - 1} other jobs" in capsys.readouterr().err


def trace_job(edit: float, prompt: str):
    def run(llm, remote=True):
        with llm.trace(prompt, remote=remote) if remote else llm.trace(prompt):
            llm.transformer.h[0].output[0][:, -1] = llm.transformer.h[0].output[0][:, -1] * edit
            hidden = llm.transformer.h[1].output[0].save()
            logits = llm.lm_head.output.save()
        return {"hidden": hidden, "logits": logits}

    return run


def test_concurrent_traces_of_unequal_prompts(server):
    jobs = [trace_job(edit, prompt) for edit, prompt in zip((0.0, 2.0, 1.0, -1.0), PROMPTS)]
    results = in_threads(server, [lambda job=job: job(LanguageModel("tiny")) for job in jobs])
    for job, result in zip(jobs, results):
        assert not isinstance(result, BaseException), result
        expected = job(local_llm(), remote=False)
        for name in expected:
            close(result[name], expected[name])


def failing(llm, prompt, n, backend=None):
    with llm.generate(prompt, max_new_tokens=n, remote=True, backend=backend) as tracer:
        with tracer.all():
            token = llm.lm_head.output[0, -1].argmax(dim=-1)
            if int(token) >= 0:
                raise ValueError("this job fails on its own")
        out = llm.generator.output.save()
    return {"out": out}


def test_a_failing_and_a_cancelled_job_leave_the_others_their_solo_results(server):
    entered, go = threading.Event(), threading.Event()

    def waiting(llm, prompt, n, backend=None):
        with llm.generate(prompt, max_new_tokens=n, remote=True, backend=backend) as tracer:
            with tracer.all():
                token = llm.lm_head.output[0, -1].argmax(dim=-1)
                with tether.local():
                    entered.set()
                    go.wait(30)
            out = llm.generator.output.save()
        return {"out": out, "token": token}

    cancelled = RemoteBackend(blocking=False)
    llm = LanguageModel("tiny")
    results: list = []

    def clients() -> list[threading.Thread]:
        jobs = {"a": lambda: zero_mlp(LanguageModel("tiny"), PROMPTS[0], 5),
                "w": lambda: waiting(LanguageModel("tiny"), PROMPTS[2], 3),
                "f": lambda: _catch(failing, PROMPTS[1], 4)}
        threads = [threading.Thread(target=lambda k=k, job=job: results.append((k, job())), name=f"client-{k}")
                   for k, job in jobs.items()]
        for thread in threads:
            thread.start()
        return threads

    with held_worker(server) as queue:
        threads = clients()
        with llm.generate(PROMPTS[3], max_new_tokens=8, remote=True, backend=cancelled) as tracer:
            with tracer.all():
                llm.lm_head.output.save()
        until(lambda: queue.depth == 4)
    assert entered.wait(30)  # the batch runs, paused in one job's local() block: cancel another job now
    canceller = threading.Thread(target=cancelled.cancel, name="canceller")  # it answers once the job ended
    canceller.start()
    record = server.hub.store.get(cancelled.job_id, LOOPBACK_OWNER)
    until(lambda: record.cancel_requested)
    go.set()
    canceller.join(30)
    for thread in threads:
        thread.join(60)
    with pytest.raises(tether.RemoteError, match="cancel"):
        cancelled.result(timeout=30)
    outcome = dict(results)
    assert isinstance(outcome["f"], tether.RemoteError) and "fails on its own" in str(outcome["f"])
    assert torch.equal(outcome["a"]["out"], _run_locally(zero_mlp, local_llm(), PROMPTS[0], 5)["out"])
    expected = _run_locally(waiting, local_llm(), PROMPTS[2], 3)
    assert torch.equal(outcome["w"]["out"], expected["out"])


def _catch(fn, prompt, n):
    try:
        return fn(LanguageModel("tiny"), prompt, n)
    except tether.RemoteError as error:
        return error


@pytest.mark.parametrize(("max_batch", "sizes"), [(1, [0, 0, 0]), (2, [0, 2, 2])])
def test_max_batch_bounds_the_batches(client_config, monkeypatch, max_batch, sizes):
    """--max-batch 1 runs every job alone; --max-batch 2 takes two of the three waiting jobs together."""
    with start_server({"tiny": tiny.tiny_gpt2()}, host="127.0.0.1", port=0, max_batch=max_batch) as other:
        assert other.wait_ready(timeout=180), "the server's workers did not start"
        monkeypatch.setattr(CONFIG.API, "_host", other.address)
        backends = [RemoteBackend() for _ in range(3)]
        fns = [lambda b=b, p=p: zero_mlp(LanguageModel("tiny"), p, 3, backend=b) for b, p in zip(backends, PROMPTS)]
        results = in_threads(other, fns)
        for result, prompt in zip(results, PROMPTS):
            assert not isinstance(result, BaseException), result
            assert torch.equal(result["out"], _run_locally(zero_mlp, local_llm(), prompt, 3)["out"])
        assert sorted(max(batch_sizes(other, b.last_job_id)) for b in backends) == sizes


def test_the_batching_flags_of_tether_serve():
    from tether.cli import parse_args

    args = parse_args(["serve", "--model", "t=tiny"])
    assert (args.max_batch, args.batch_wait_ms, args.batch_tokens, args.batch_local_wait) == (16, 5.0, 8192, 1.0)
    args = parse_args(["serve", "--model", "t=tiny", "--max-batch", "1", "--batch-wait-ms", "0",
                       "--batch-local-wait", "2.5"])
    assert (args.max_batch, args.batch_wait_ms, args.batch_local_wait) == (1, 0.0, 2.5)
