"""A job that writes into the hosted model's weights fails with a clear error, and no later job sees the
changed weights: they are restored from the model's source, or the model stops serving."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import grpc
import pytest
import torch

from tether import CONFIG, LanguageModel, RemoteError, tiny
from tether.v1 import jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc, program_pb2

PROMPT = "hello"


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2(), "fixed": tiny.tiny_gpt2()}


LOADS = Path(tempfile.mkdtemp(prefix="tether-loads-")) / "loads"  # a line per time the server loaded "tiny" again


def _load_tiny(loads: Path):
    """The source of "tiny": it runs in the model's worker process, so it counts its loads in a file."""
    with loads.open("a") as file:
        file.write("loaded\n")
    return tiny.tiny_gpt2()


SERVER_OPTIONS = {"sources": {"tiny": functools.partial(_load_tiny, LOADS)}}  # "fixed" was given as an object only


def _loads() -> int:
    return len(LOADS.read_text().splitlines()) if LOADS.exists() else 0

pytestmark = pytest.mark.usefixtures("client_config")  # every test talks to this module's server


def _write_weights(remote: LanguageModel) -> RemoteError:
    with pytest.raises(RemoteError, match="weights in place") as info:
        with remote.trace(PROMPT, remote=True):
            with torch.no_grad():
                remote.transformer.h[0].mlp.c_fc.weight.mul_(2)
            remote.lm_head.output.save()
    return info.value


def _logits(remote: LanguageModel) -> torch.Tensor:
    with remote.trace(PROMPT, remote=True):
        logits = remote.lm_head.output.save()
    return logits


def test_weights_a_job_wrote_into_are_restored_before_the_next_job(llm):
    CONFIG.APP.DISPLAY = False
    remote = LanguageModel("tiny")
    with llm.trace(PROMPT):
        expected = llm.lm_head.output.save()
    error = _write_weights(remote)
    assert "put them back" in str(error) and _loads() == 1  # loaded again once, for this job
    assert torch.equal(_logits(remote), expected)  # the original weights, not doubled ones


def test_weights_that_cannot_be_restored_take_the_model_out_of_service(llm, server):
    CONFIG.APP.DISPLAY = False
    remote = LanguageModel("fixed")
    error = _write_weights(remote)
    assert "restart" in str(error)
    with pytest.raises(RemoteError, match="out of service") as refused:
        _logits(remote)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION.name
    job = jobs_pb2.SubmitJobRequest(job=jobs_pb2.JobSpec(request_id="retry-me", program=program_pb2.Program(
        kind=program_pb2.PROGRAM_KIND_TRACE, model="fixed", source="x = 1\n")))
    with grpc.insecure_channel(server.address) as channel:
        for _ in range(2):  # a refused job leaves no record: its retry is refused too, not "existing"
            with pytest.raises(grpc.RpcError) as again:
                jobs_pb2_grpc.JobServiceStub(channel).SubmitJob(job, timeout=10)
            assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with grpc.insecure_channel(server.address) as channel:
        listed = models_pb2_grpc.ModelServiceStub(channel).ListModels(models_pb2.ListModelsRequest(), timeout=10)
    assert {m.name: m.ready for m in listed.models} == {"fixed": False, "tiny": True}
    with llm.trace(PROMPT):
        expected = llm.lm_head.output.save()
    assert torch.equal(_logits(LanguageModel("tiny")), expected)  # the other model still serves
