"""Issue 3: `remote=True` against a real loopback server gives exactly what the same code gives locally.

Every test runs the same body twice, locally on a fresh tiny model and remotely on a `LanguageModel("tiny")`
built from the server's spec alone, and compares the results bit for bit (torch.equal, same dtype/shape).
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
import torch

import tether
from tether import CONFIG, LanguageModel, NNsight, tiny
from tether.client import RemoteBackend, aio, channel, driver
from tether.server.app import start_server
from tether.v1 import jobs_pb2, jobs_pb2_grpc

PROMPT = "The quick brown fox"
OTHER = "Hello"


def served() -> dict:
    """"tiny" (a 2-layer GPT-2 + tokenizer) and "net"."""
    return {"tiny": tiny.tiny_gpt2(), "net": tiny.tiny_net()}


pytestmark = pytest.mark.usefixtures("client_config")  # every test talks to this module's server


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


# ---- model spec ---------------------------------------------------------------------------------------


def test_language_model_from_the_server_spec_alone(rllm, llm, server):
    assert repr(rllm) == repr(llm)
    assert all(p.device.type == "meta" for p in rllm._module.parameters())
    ids = rllm.tokenizer(PROMPT)["input_ids"]
    assert ids == llm.tokenizer(PROMPT)["input_ids"]
    assert rllm.tokenizer.decode(ids) == PROMPT
    assert len(rllm.transformer.h) == 2


def test_unknown_local_name_without_a_server_says_so(monkeypatch):
    monkeypatch.setattr(CONFIG.API, "_host", "127.0.0.1:1")  # nothing listens on port 1
    with pytest.raises(tether.TetherError, match="No model named 'nowhere' here.*127.0.0.1:1"):
        LanguageModel("nowhere")


def test_name_the_server_does_not_host_lists_what_it_does():
    with pytest.raises(tether.TetherError, match="hosts: net, tiny"):
        LanguageModel("no-such-model")


# ---- the local features, remotely ----------------------------------------------------------------------


def test_get(llm, rllm):
    with llm.trace(PROMPT):
        hidden = llm.transformer.h[0].output[0].save()
        logits = llm.lm_head.output.save()
    with rllm.trace(PROMPT, remote=True) as tracer:
        r_hidden = rllm.transformer.h[0].output[0].save()
        r_logits = rllm.lm_head.output.save()
    _same(hidden, r_hidden)
    _same(logits, r_logits)
    assert torch.equal(r_logits.value, logits)  # walkthrough spelling
    assert tracer.job_id and tracer.backend.state == "COMPLETED"



def test_a_job_that_outlasts_the_submit_wait_is_followed_to_its_end(llm, rllm, monkeypatch, capsys):
    """A blocking job without local() blocks is one waiting SubmitJob; past the wait, WatchJob follows it."""
    monkeypatch.setattr(driver, "SUBMIT_WAIT_S", 0.0)  # the server answers before the job ends
    with llm.trace(PROMPT):
        logits = llm.lm_head.output.save()
    with rllm.trace(PROMPT, remote=True) as tracer:
        r_logits = rllm.lm_head.output.save()
        print("ran remotely")
    _same(logits, r_logits)
    assert tracer.backend.state == "COMPLETED" and "ran remotely" in capsys.readouterr().out


class _LostAnswer(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset (simulated)"


def test_a_lost_submit_answer_finds_the_job_by_its_request_id(llm, rllm, monkeypatch):
    """The job was queued but its SubmitJob answer was lost: the client asks again with the same request_id
    (no second job is run) and follows the job to its values."""
    real_unary = channel.Connection.unary
    submitted: list[str] = []

    def lose_the_first_answer(self, method, request, metadata, timeout=None):
        response = real_unary(self, method, request, metadata, timeout=timeout)
        if isinstance(request, jobs_pb2.SubmitJobRequest):
            submitted.append(response.job_id)
            if len(submitted) == 1:
                raise _LostAnswer()
        return response

    monkeypatch.setattr(channel.Connection, "unary", lose_the_first_answer)
    with llm.trace(PROMPT):
        logits = llm.lm_head.output.save()
    with rllm.trace(PROMPT, remote=True) as tracer:
        r_logits = rllm.lm_head.output.save()
    _same(logits, r_logits)
    assert len(submitted) == 2 and submitted[0] == submitted[1] == tracer.job_id  # one job, found again

def test_set(llm, rllm):
    with llm.trace(PROMPT):
        llm.transformer.h[0].attn.output[0][:, -1] = 0
        llm.transformer.h[1].mlp.output = llm.transformer.h[1].mlp.output * 2
        logits = llm.lm_head.output.save()
    with rllm.trace(PROMPT, remote=True):
        rllm.transformer.h[0].attn.output[0][:, -1] = 0
        rllm.transformer.h[1].mlp.output = rllm.transformer.h[1].mlp.output * 2
        r_logits = rllm.lm_head.output.save()
    _same(logits, r_logits)


def test_batching_with_invokes(llm, rllm):
    with llm.trace() as tracer:
        with tracer.invoke(PROMPT):
            a = llm.lm_head.output.save()
        with tracer.invoke(OTHER):
            llm.transformer.h[0].output[0][:] = 0
            b = llm.lm_head.output.save()
    with rllm.trace(remote=True) as tracer:
        with tracer.invoke(PROMPT):
            r_a = rllm.lm_head.output.save()
        with tracer.invoke(OTHER):
            rllm.transformer.h[0].output[0][:] = 0
            r_b = rllm.lm_head.output.save()
    _same(a, r_a)
    _same(b, r_b)


def test_gradients(x):
    net, rnet = NNsight(tiny.tiny_net()), NNsight(tiny.tiny_net())
    with net.trace(x):
        net.layer1.output.requires_grad = True
        net.layer2.output.grad = net.layer2.output.grad * 2
        g1 = net.layer1.output.grad.save()
        loss = net.output.sum()
        loss.backward()
    with rnet.trace(x, remote=True, model_name="net"):
        rnet.layer1.output.requires_grad = True
        rnet.layer2.output.grad = rnet.layer2.output.grad * 2
        r_g1 = rnet.layer1.output.grad.save()
        loss = rnet.output.sum()
        loss.backward()
    _same(g1, r_g1)


def test_generation_with_per_step_saves(llm, rllm):
    with llm.generate(PROMPT, max_new_tokens=5) as tracer:
        steps = list().save()
        tracer.all()
        steps.append(llm.lm_head.output[0, -1].argmax(dim=-1))
        tokens = llm.generator.output.save()
    with rllm.generate(PROMPT, max_new_tokens=5, remote=True) as tracer:
        r_steps = list().save()
        tracer.all()
        r_steps.append(rllm.lm_head.output[0, -1].argmax(dim=-1))
        r_tokens = rllm.generator.output.save()
    _same(tokens, r_tokens)
    assert len(r_steps) == len(steps) == 5
    for a, b in zip(steps, r_steps):
        _same(a, b)


def test_session_with_values_across_traces(llm, rllm):
    with llm.session():
        with llm.trace(PROMPT):
            hs = llm.transformer.h[-1].output[:, -1, :]
        with llm.trace(OTHER):
            llm.transformer.h[0].output[:, -1, :] = hs
            out = llm.lm_head.output.save()
    with rllm.session(remote=True):
        with rllm.trace(PROMPT):
            r_hs = rllm.transformer.h[-1].output[:, -1, :]
        with rllm.trace(OTHER):
            rllm.transformer.h[0].output[:, -1, :] = r_hs
            r_out = rllm.lm_head.output.save()
    _same(out, r_out)
    with pytest.raises(tether.UnsavedValueError):
        print(r_hs)


def test_early_stop_and_unreached_names(x):
    net, rnet = NNsight(tiny.tiny_net()), NNsight(tiny.tiny_net())
    with net.trace(x) as tracer:
        h = net.layer1.output.save()
        tracer.stop()
        after = net.layer2.output.save()
    with rnet.trace(x, remote=True, model_name="net") as tracer:
        r_h = rnet.layer1.output.save()
        tracer.stop()
        r_after = rnet.layer2.output.save()
    _same(h, r_h)
    with pytest.raises(tether.ValueNotReachedError):
        print(after)
    with pytest.raises(tether.ValueNotReachedError, match="stopped early"):
        print(r_after)


def test_a_stop_at_a_module_that_already_ran_ends_the_remote_trace_quietly(x):
    """Walkthrough cell [83] remotely: layer2 is read before the stop at layer1; the job completes and the
    value from after the stop point raises when used, as locally."""
    rnet = NNsight(tiny.tiny_net())
    with rnet.trace(x, remote=True, model_name="net"):
        r_l2 = rnet.layer2.output.save()
        rnet.layer1.output.stop()
    with pytest.raises(tether.ValueNotReachedError, match="stopped early"):
        print(r_l2)


def test_scan(x):
    net, rnet = NNsight(tiny.tiny_net()), NNsight(tiny.tiny_net())
    with net.scan(x):
        dim = net.layer1.output.shape[-1]
        out_shape = net.output.shape
    with rnet.scan(x, remote=True, model_name="net"):
        r_dim = rnet.layer1.output.shape[-1]
        r_out_shape = rnet.output.shape
    assert (r_dim, r_out_shape) == (dim, out_shape) == (10, torch.Size([1, 2]))


def test_unsaved_values_and_remote_print(rllm, capsys):
    with rllm.trace(PROMPT, remote=True):
        hidden = rllm.transformer.h[0].mlp.output  # not saved
        n = hidden.shape[-1]
        print("width", n)
    assert n == 64
    assert "width 64" in capsys.readouterr().out
    with pytest.raises(tether.UnsavedValueError, match="hidden"):
        hidden.sum()


def test_values_the_body_reads_travel_with_the_job(llm, rllm):
    scale = torch.full((64,), 0.5)
    import math as m

    def halve(t):  # a user function: shipped as source, with its own free names
        return t * scale * m.sqrt(4.0) / 2

    with llm.trace(PROMPT):
        llm.transformer.h[0].mlp.output = halve(llm.transformer.h[0].mlp.output)
        out = llm.lm_head.output.save()
    with rllm.trace(PROMPT, remote=True):
        rllm.transformer.h[0].mlp.output = halve(rllm.transformer.h[0].mlp.output)
        r_out = rllm.lm_head.output.save()
    _same(out, r_out)


# ---- modes: blocking, non-blocking, async --------------------------------------------------------------


def test_non_blocking_submit_then_fetch_with_the_same_backend(llm, rllm):
    with llm.trace(PROMPT):
        logits = llm.lm_head.output.save()
    with rllm.trace(PROMPT, remote=True, blocking=False) as tracer:
        r_logits = rllm.lm_head.output.save()
    job_id = tracer.job_id
    assert job_id and tracer.backend.job_id == job_id
    with pytest.raises(tether.TetherError, match="not available yet"):
        print(r_logits.shape)
    RemoteBackend(job_id=job_id).result(timeout=60)  # waits on WatchJob (no polling) without taking it
    with rllm.trace(PROMPT, remote=True, backend=tracer.backend) as again:
        r_logits = rllm.lm_head.output.save()
    assert again.job_id == job_id and tracer.backend.job_id is None  # fetched: the next call submits anew
    _same(logits, r_logits)


def test_non_blocking_result_and_blocking_reattach(llm, rllm):
    with llm.trace(PROMPT):
        logits = llm.lm_head.output.save()
    backend = RemoteBackend(blocking=False)
    with rllm.trace(PROMPT, remote=True, backend=backend):
        r_logits = rllm.lm_head.output.save()
    values = backend.result(timeout=60)
    _same(logits, values["r_logits"])
    with rllm.trace(PROMPT, remote=True, blocking=False) as tracer:
        r_logits = rllm.lm_head.output.save()
    reattach = RemoteBackend(job_id=tracer.job_id, blocking=True)
    with rllm.trace(PROMPT, remote=True, backend=reattach):
        r_logits = rllm.lm_head.output.save()
    _same(logits, r_logits)


def test_async_backend_and_fetch(llm, rllm):
    with llm.trace(PROMPT):
        logits = llm.lm_head.output.save()
    backend = aio.AsyncBackend()
    with rllm.trace(PROMPT, remote=True, backend=backend):
        r_logits = rllm.lm_head.output.save()
    with pytest.raises(tether.TetherError, match="not available yet"):
        r_logits.sum()
    values = asyncio.run(backend.run())
    _same(logits, values["r_logits"])
    with rllm.trace(PROMPT, remote=True, blocking=False) as tracer:
        r_logits = rllm.lm_head.output.save()
    values = asyncio.run(aio.fetch(tracer.job_id, timeout=60))
    _same(logits, values["r_logits"])


def test_watch_resumes_after_a_dropped_stream_without_duplicates(rllm, server):
    with rllm.trace(PROMPT, remote=True, blocking=False) as tracer:
        rllm.lm_head.output.save()
    RemoteBackend(job_id=tracer.job_id).result(timeout=60)
    with grpc.insecure_channel(server.address) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        def sequences(stream):  # each response's events: `event`, then `more_events`
            return (e.sequence for r in stream for e in [r.event, *r.more_events])

        everything = list(sequences(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=tracer.job_id))))
        stream = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=tracer.job_id))
        events = sequences(stream)
        seen = [next(events), next(events)]
        stream.cancel()  # the client drops its stream mid-way
        rest = list(sequences(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=tracer.job_id,
                                                                      after_sequence=seen[-1]))))
    assert everything == list(range(1, len(everything) + 1))
    assert seen + rest == everything


# ---- errors ------------------------------------------------------------------------------------------


def test_error_in_the_body_maps_to_the_users_line(rllm):
    with pytest.raises(tether.RemoteError) as info:
        with rllm.trace(PROMPT, remote=True):
            hidden = rllm.transformer.h[0].output
            hidden[0, 0, 10_000].save()  # IndexError on the server
    error = info.value
    assert error.remote_type.endswith("IndexError")
    assert __file__ in str(error) and "hidden[0, 0, 10_000]" in str(error)
    with rllm.trace(PROMPT, remote=True):  # the server keeps serving
        ok = rllm.lm_head.output.save()
    assert ok.shape[-1] == 512


def test_rejected_program_names_the_call_and_the_fix(rllm):
    with pytest.raises(tether.RemoteError, match="local") as info:
        with rllm.trace(PROMPT, remote=True):
            import os

            os.getcwd()
    assert info.value.code == "INVALID_ARGUMENT"


def test_unknown_model_lists_the_hosted_ones(x):
    net = NNsight(tiny.tiny_net())
    with pytest.raises(tether.RemoteError, match="net, tiny") as info:
        with net.trace(x, remote=True, model_name="nope"):
            net.output.save()
    assert info.value.code == "NOT_FOUND"


def test_no_server_says_how_to_point_at_one(x):
    net = NNsight(tiny.tiny_net())
    with pytest.raises(tether.RemoteError, match="tether serve") as info:
        with net.trace(x, remote=True, model_name="net", backend="127.0.0.1:1"):
            net.output.save()
    assert info.value.code == "UNAVAILABLE"


def test_api_keys_from_argument_environment_and_config_file(x, tmp_path, monkeypatch):
    net = NNsight(tiny.tiny_net())
    with start_server({"net": tiny.tiny_net()}, host="127.0.0.1", port=0, api_keys=["sesame"]) as keyed:
        with pytest.raises(tether.RemoteError, match="set_default_api_key") as info:
            with net.trace(x, remote=True, model_name="net", backend=keyed.address, api_key="wrong"):
                net.output.save()
        assert info.value.code == "UNAUTHENTICATED"
        with net.trace(x, remote=True, model_name="net", backend=keyed.address, api_key="sesame"):
            out = net.output.save()
        monkeypatch.setenv("TETHER_API_KEY", "sesame")
        with net.trace(x, remote=True, model_name="net", backend=keyed.address):
            out = net.output.save()
        monkeypatch.delenv("TETHER_API_KEY")
        CONFIG.set_default_api_key("sesame")
        saved = json.loads((tmp_path / "config" / "tether" / "config.json").read_text())
        assert saved["api_key"] == "sesame"
        monkeypatch.setattr(CONFIG.API, "_api_key", None)  # a new process: only the file has it
        with net.trace(x, remote=True, model_name="net", backend=keyed.address):
            out = net.output.save()
    _same(out, tiny.tiny_net()(x))


def test_a_large_result_streams_in_chunks_and_is_reassembled(rllm):
    with rllm.trace(PROMPT, remote=True):
        big = torch.linspace(0, 1, 16 << 20).save()  # 64 MiB: 64 chunks of at most 1 MiB
        logits = rllm.lm_head.output.save()
    assert torch.equal(big, torch.linspace(0, 1, 16 << 20))
    assert logits.shape[-1] == 512


def test_cancel_a_queued_job(x):
    import threading

    net = NNsight(tiny.tiny_net())
    entered, release = threading.Event(), threading.Event()

    def holder() -> None:  # keeps the only "net" worker busy inside a local() block
        with net.trace(x, remote=True, model_name="net"):
            net.output.save()
            with tether.local():
                entered.set()
                release.wait(30)

    thread = threading.Thread(target=holder, name="holder")
    thread.start()
    try:
        assert entered.wait(30)
        backend = RemoteBackend(blocking=False)
        with net.trace(x, remote=True, model_name="net", backend=backend):
            net.output.save()
        assert backend.status() == "QUEUED"
        assert backend.cancel() == "CANCELLED"
        with pytest.raises(tether.RemoteError, match="cancelled"):
            backend.result(timeout=30)
    finally:
        release.set()
        thread.join(30)


def test_local_blocks_need_a_blocking_job(rllm):
    with pytest.raises(tether.TetherError, match="blocking"):
        with rllm.trace(PROMPT, remote=True, blocking=False) as tracer:
            with tracer.local():
                print("here")


def test_a_plain_torch_model_from_the_spec_prints_the_servers_tree():
    net = LanguageModel("net")  # no Hugging Face config: a skeleton of the server's modules
    assert repr(net) == repr(tiny.tiny_net())
    assert net.tokenizer is None


def test_submodules_bound_outside_the_body_travel_as_references(llm, rllm):
    first, layers = llm.transformer.h[0], llm.transformer.h[:2]
    with llm.trace(PROMPT):
        first.mlp.output = first.mlp.output * 0.5
        outs = list().save()
        for layer in layers:
            outs.append(layer.output)
    r_first, r_layers = rllm.transformer.h[0], rllm.transformer.h[:2]
    with rllm.trace(PROMPT, remote=True):
        r_first.mlp.output = r_first.mlp.output * 0.5
        r_outs = list().save()
        for layer in r_layers:
            r_outs.append(layer.output)
    for a, b in zip(outs, r_outs):
        _same(a, b)


def _is_even(n: int) -> bool:
    return n == 0 or _is_odd(n - 1)


def _is_odd(n: int) -> bool:
    return n != 0 and _is_even(n - 1)


def _scaled(t: torch.Tensor) -> torch.Tensor:
    return t * 0.25 if _is_even(2) else t


def test_mutually_recursive_functions_are_shipped_once(llm, rllm):
    with llm.trace(PROMPT):
        llm.transformer.h[0].mlp.output = _scaled(llm.transformer.h[0].mlp.output)
        even = _is_even(llm.lm_head.output.shape[1])
        out = llm.lm_head.output.save()
    with rllm.trace(PROMPT, remote=True):
        rllm.transformer.h[0].mlp.output = _scaled(rllm.transformer.h[0].mlp.output)
        r_even = _is_even(rllm.lm_head.output.shape[1])
        r_out = rllm.lm_head.output.save()
    assert r_even == even
    _same(out, r_out)
