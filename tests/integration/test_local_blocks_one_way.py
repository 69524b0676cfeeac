"""`local()` blocks whose values the job never reads: the job goes on while its client runs them (issue 12,
a `local()` block per generated token), and nothing else changes: the blocks run in order, once each, with
the values of their step; a block that raises still ends the job in ERROR and no later block runs; a client
that never answers still fails the job. Blocks whose values the job reads are still waited for.

A real loopback server; the served model notes each run of its layer in a file, so a test sees from the
client how far the worker got. Waits are on conditions with timeouts.
"""

from __future__ import annotations

import inspect
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from noted_models import RunsTwice, runs

import tether
from tether import NNsight, tiny
from tether.client import RemoteBackend
from tether.server.app import start_server

PROMPT = "The quick brown fox"
WAIT_S = 30.0
NOTES = Path(tempfile.mkdtemp(prefix="tether-notes-")) / "runs"

pytestmark = pytest.mark.usefixtures("client_config")


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2(), "twice": RunsTwice(NOTES)}


def _polled(read: Callable[[], Any], done: Callable[[Any], bool]) -> Any:
    """`read()` again every few ms until `done` says its value will do, at most WAIT_S: its last value."""
    deadline = time.monotonic() + WAIT_S
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.005)
    return value


@pytest.fixture
def x4() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 4)


@pytest.fixture
def twice() -> NNsight:
    NOTES.write_text("")
    return NNsight(RunsTwice(Path(tempfile.mkdtemp()) / "local-runs"))  # the local reference (its own notes)


def test_the_job_goes_on_while_its_client_runs_a_block_whose_values_it_does_not_read(server, twice, x4):
    remote = NNsight(RunsTwice(NOTES))  # (only its structure is used: the job runs on the served model)
    ran_meanwhile, sums = [], []
    with remote.trace(x4, remote=True, model_name="twice", backend=server.address) as tracer:
        first = remote.layer.output
        with tracer.local():
            sums.append(first.sum())
            # the layer's second run comes after this block: it happens meanwhile only if the job went on
            ran_meanwhile.append(_polled(lambda: runs(NOTES), lambda ran: ran >= 2))
        out = remote.output.save()
    with twice.trace(x4):
        reference = twice.output.save()
    assert ran_meanwhile == [2]
    assert torch.equal(out, reference)
    assert torch.equal(sums[0], twice.layer(x4).sum())


def test_a_blocks_value_the_job_reads_only_by_augmenting_it_comes_back(llm, rllm):
    def run(model, **remote):
        with model.trace(PROMPT, **remote) as tracer:
            hidden = model.transformer.h[0].output
            with tracer.local():
                step = int(hidden.shape[1])
            step += 1  # (reads step: the job waits for the block, which sends it back)
            top = model.lm_head.output[0, -1].argmax().save()
        return step, top

    step, top = run(llm)
    r_step, r_top = run(rllm, remote=True)
    assert step == r_step == len(llm.tokenizer(PROMPT)["input_ids"]) + 1
    assert torch.equal(top, r_top)


def test_a_block_whose_value_the_job_reads_is_waited_for(server, twice, x4):
    remote = NNsight(RunsTwice(NOTES))
    ran_by_then = []
    with remote.trace(x4, remote=True, model_name="twice", backend=server.address) as tracer:
        h = remote.layer.output
        with tracer.local():
            ran_by_then.append(runs(NOTES))
            h = h * 2
        remote.layer.output = h
        out = remote.output.save()
    with twice.trace(x4):
        twice.layer.output = twice.layer.output * 2
        reference = twice.output.save()
    assert ran_by_then == [1]  # the worker waited for the answer
    assert torch.equal(out, reference)


@pytest.mark.parametrize("body", ["append", "augmented"])
def test_a_block_at_every_generation_step_sees_each_token_once_and_in_order(llm, rllm, body):
    def run(model, **remote):
        seen, count = [], 0
        with model.generate(PROMPT, max_new_tokens=12, do_sample=False, **remote) as tracer:
            tracer.all()
            token = model.lm_head.output[0, -1].argmax(dim=-1)
            with tracer.local():
                if body == "append":
                    seen.append(int(token))
                else:
                    count += 1
                    seen = [*seen, (count, int(token))]
            tokens = model.generator.output.save()
        return seen, tokens

    seen, tokens = run(llm)
    r_seen, r_tokens = run(rllm, remote=True)
    assert len(r_seen) == 12 and r_seen == seen
    assert torch.equal(tokens, r_tokens)


def test_a_block_that_raises_ends_the_job_in_error_and_no_later_block_runs(server, rllm, capsys):
    ran: list[int] = []
    job_ids: list[str] = []
    with pytest.raises(ValueError, match="third token"):
        with rllm.generate(PROMPT, max_new_tokens=12, do_sample=False, remote=True) as tracer:
            tracer.all()
            token = rllm.lm_head.output[0, -1].argmax(dim=-1)
            with tracer.local():
                job_ids.append(tracer.job_id)
                ran.append(int(token))
                if len(ran) == 3:
                    raise ValueError("no third token")
            rllm.generator.output.save()
    assert len(ran) == 3
    backend = RemoteBackend(server.address, job_id=job_ids[0])
    assert backend.status() == "ERROR"
    with pytest.raises(tether.RemoteError, match="third token"):
        backend.result(timeout=WAIT_S)
    assert "no third token" in capsys.readouterr().err


def test_a_client_that_never_answers_fails_the_job_after_the_local_call_timeout(x):
    net = NNsight(tiny.tiny_net())
    handle = start_server({"net": tiny.tiny_net()}, host="127.0.0.1", port=0, local_call_timeout=0.5)
    try:
        with pytest.raises(tether.RemoteError, match="did not answer"):
            with net.trace(x, remote=True, model_name="net", backend=handle.address) as tracer:
                h = net.layer1.output
                with tracer.local():
                    total = float(h.sum())  # noqa: F841 (the job reads nothing the block binds)
                    _polled(RemoteBackend(handle.address, job_id=tracer.job_id).status, lambda s: s == "ERROR")
                out = net.output.save()  # noqa: F841
        with net.trace(x, remote=True, model_name="net", backend=handle.address):
            after = net.output.save()  # the worker runs the next job
        assert torch.equal(after, tiny.tiny_net()(x))
    finally:
        handle.stop(grace=0)


def _printed_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(("block", "after"))]


def test_lines_printed_after_a_block_come_after_the_blocks_own_output(llm, rllm, capsys):
    def run(model, **remote):
        steps = []
        with model.generate(PROMPT, max_new_tokens=6, do_sample=False, **remote) as tracer:
            tracer.all()
            token = model.lm_head.output[0, -1].argmax(dim=-1)
            with tracer.local():
                steps.append(int(token))
                print("block", len(steps))
            print("after the block")  # on the server, in the remote run
            model.generator.output.save()
        return _printed_lines(capsys)

    local_lines = run(llm)
    assert local_lines == [line for n in range(1, 7) for line in (f"block {n}", "after the block")]
    assert run(rllm, remote=True) == local_lines


def test_no_line_printed_after_a_block_that_raises_reaches_the_client(rllm, capsys):
    steps = []
    with pytest.raises(ValueError, match="second"):
        with rllm.generate(PROMPT, max_new_tokens=6, do_sample=False, remote=True) as tracer:
            tracer.all()
            token = rllm.lm_head.output[0, -1].argmax(dim=-1)
            with tracer.local():
                steps.append(int(token))
                print("block", len(steps))
                if len(steps) == 2:
                    raise ValueError("no second step")
            print("after the block")
            rllm.generator.output.save()
    assert _printed_lines(capsys) == ["block 1", "after the block", "block 2"]


def test_a_failed_block_the_job_went_on_from_is_reported_as_that_block_at_the_next_one(server, rllm):
    job_ids: list[str] = []
    lines: list[int] = []
    with pytest.raises(KeyError, match="first"):
        with rllm.trace(PROMPT, remote=True) as tracer:
            hidden = rllm.transformer.h[0].output
            with tracer.local():
                lines.append(inspect.currentframe().f_lineno)  # (the block's first line: its id)
                job_ids.append(tracer.job_id)
                raise KeyError("first")
            logits = rllm.lm_head.output
            with tracer.local():
                logits = logits * 2  # (read below: the job waits for this block)
            rllm.lm_head.output = logits
            hidden.save()
    failure = RemoteBackend(server.address, job_id=job_ids[0])
    assert failure.status() == "ERROR"
    with pytest.raises(tether.RemoteError) as raised:
        failure.result(timeout=WAIT_S)
    assert f"the local() block {lines[0]} raised on the client: 'first'" in str(raised.value)


def test_a_job_cancelled_while_its_client_runs_a_block_sends_no_later_block(server, twice, x4):
    remote = NNsight(RunsTwice(NOTES))
    ran, job_ids = [], []
    with pytest.raises(tether.RemoteError):
        with remote.trace(x4, remote=True, model_name="twice", backend=server.address) as tracer:
            first = remote.layer.output
            with tracer.local():
                ran.append(("A", first.shape))
                job_ids.append(tracer.job_id)
                RemoteBackend(server.address, job_id=tracer.job_id).cancel()
            out = remote.output
            with tracer.local():
                ran.append(("B", out.shape))
            out.save()
    assert ran == [("A", (2, 4))]
    assert RemoteBackend(server.address, job_id=job_ids[0]).status() == "CANCELLED"


def test_the_remote_traceback_of_a_block_the_job_went_on_from_is_that_of_a_block_it_waited_for(server, rllm):
    def failure(job_ids: list[str]) -> str:
        with pytest.raises(tether.RemoteError) as raised:
            RemoteBackend(server.address, job_id=job_ids[0]).result(timeout=WAIT_S)
        return re.sub(r"\b\d+\b", "N", str(raised.value).replace(job_ids[0], "<job>"))  # (lines differ)

    went_on: list[str] = []
    with pytest.raises(KeyError):
        with rllm.trace(PROMPT, remote=True) as tracer:
            hidden = rllm.transformer.h[0].output
            with tracer.local():
                went_on.append(tracer.job_id)
                note = hidden.shape
                raise KeyError("no")
            rllm.lm_head.output.save()
    waited: list[str] = []
    with pytest.raises(KeyError):
        with rllm.trace(PROMPT, remote=True) as tracer:
            hidden = rllm.transformer.h[0].output
            with tracer.local():
                waited.append(tracer.job_id)
                note = hidden.shape
                raise KeyError("no")
            hidden = note  # the job reads the block's value: it waits for the answer
            rllm.lm_head.output.save()
    expected = failure(waited)
    assert "with tracer.local():" in expected and "raise KeyError" not in expected  # the block's line
    assert failure(went_on) == expected


def test_the_jobs_memory_limit_holds_while_its_client_runs_a_block(x):
    net = NNsight(tiny.tiny_net())
    handle = start_server({"net": tiny.tiny_net()}, host="127.0.0.1", port=0, job_memory=128 << 20)
    seen: list[str] = []
    try:
        with pytest.raises(tether.RemoteError, match="per-job memory limit"):
            with net.trace(x, remote=True, model_name="net", backend=handle.address) as tracer:
                h = net.layer1.output
                with tracer.local():  # the job goes on meanwhile, and allocates past its limit
                    status = RemoteBackend(handle.address, job_id=tracer.job_id).status
                    seen.append(_polled(status, lambda s: s != "RUNNING"))
                big = torch.ones(96 << 20)  # 384 MiB, touched
                h = h + float(big.sum())
                net.output.save()
        assert seen == ["ERROR"]  # (the block ran until the server had ended the job)
        with net.trace(x, remote=True, model_name="net", backend=handle.address):
            after = net.output.save()  # the restarted worker runs the next job
        assert torch.equal(after, tiny.tiny_net()(x))
    finally:
        handle.stop(grace=0)


def test_blocks_in_the_traces_of_a_session_run_once_each_with_their_traces_values(llm, rllm):
    def run(model, **remote):
        seen = []
        with model.session(**remote):
            with model.trace(PROMPT):
                top = model.lm_head.output[0, -1].argmax()
                with tether.local():
                    seen.append(int(top))
            with model.trace("Hello world"):
                top = model.lm_head.output[0, -1].argmax()
                with tether.local():
                    seen.append(int(top))
                logits = model.lm_head.output.save()
        return seen, logits

    seen, logits = run(llm)
    r_seen, r_logits = run(rllm, remote=True)
    assert len(r_seen) == 2 and r_seen == seen
    assert torch.equal(r_logits, logits)
