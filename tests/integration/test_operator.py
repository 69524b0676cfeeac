"""Operating a running server: deploy and evict models, their states (loading, ready, failed), everyone's
jobs, stopping any job, and admin keys; through tether.client.admin.Admin against a real loopback server.
(The `tether` commands themselves run as processes in test_operator_cli.py.)"""

from __future__ import annotations

import threading

import pytest
import torch

from tether import LanguageModel, NNsight, RemoteError, tiny
from tether.client import RemoteBackend
from tether.client.admin import Admin
from tether.placement_options import Placement
from tether.server.app import start_server
from tether.server.auth import read_keys
from tether.server.registry import load_model
from tether.v1 import jobs_pb2, models_pb2, values_pb2

WAIT = 60.0  # seconds: the longest a test waits for the server
PROMPT = "The quick brown fox"


class Gated(torch.nn.Module):
    """A model whose forward waits for the test: it sets `entered`, then waits for `gate`."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)
        self.entered, self.gate = threading.Event(), threading.Event()

    def forward(self, x):
        self.entered.set()
        assert self.gate.wait(WAIT), "the test never opened the gate"
        return self.layer(x)


GATED = Gated()


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2(), "gated": GATED}


@pytest.fixture
def admin(client_config):
    with Admin(client_config.address) as admin:
        yield admin


def _models(admin: Admin) -> dict[str, models_pb2.ModelInfo]:
    return {m.name: m for m in admin.models()}


def _logits(model: LanguageModel, **options) -> torch.Tensor:
    with model.trace(PROMPT, **options):
        logits = model.lm_head.output.save()
    return logits


def test_models_lists_state_replicas_device_dtype_and_queue(admin):
    models = _models(admin)
    assert sorted(models) == ["gated", "tiny"]
    tiny_info = models["tiny"]
    assert (tiny_info.state, tiny_info.ready, tiny_info.replicas, tiny_info.device, tiny_info.queue_depth) == (
        models_pb2.MODEL_STATE_READY, True, 1, "cpu", 0)
    assert tiny_info.data_type == values_pb2.DATA_TYPE_FLOAT32


def test_deploy_serves_equal_to_local_and_evict_takes_it_away(admin):
    info = admin.deploy("tiny_bf16", "tiny", replicas=2, dtype="bfloat16", wait=WAIT)
    assert (info.state, info.replicas, info.data_type) == (
        models_pb2.MODEL_STATE_READY, 2, values_pb2.DATA_TYPE_BFLOAT16)
    assert _models(admin)["tiny_bf16"].state == models_pb2.MODEL_STATE_READY
    remote = LanguageModel("tiny_bf16")
    model, tokenizer = load_model("tiny", Placement(dtype=torch.bfloat16))
    local = _logits(LanguageModel(model, tokenizer=tokenizer))
    for _ in range(3):  # two replicas: each gives the same bits
        r = _logits(remote, remote=True)
        assert r.dtype == torch.bfloat16 and torch.equal(r, local)
    with pytest.raises(RemoteError, match="ALREADY_EXISTS.*evict it first"):
        admin.deploy("tiny_bf16", "tiny")
    assert admin.evict("tiny_bf16") == 0
    assert "tiny_bf16" not in _models(admin)
    with pytest.raises(RemoteError, match="no model named 'tiny_bf16'"):
        _logits(remote, remote=True)
    with pytest.raises(RemoteError, match="NOT_FOUND"):
        admin.evict("tiny_bf16")


def test_a_model_that_fails_to_load_is_listed_failed_and_refuses_jobs(admin):
    info = admin.deploy("broken", "no_such_module:build", wait=WAIT)
    assert info.state == models_pb2.MODEL_STATE_FAILED and "no_such_module" in info.state_message
    with pytest.raises(RemoteError, match="not serving: cannot load"):
        LanguageModel("broken")
    admin.evict("broken")


def test_a_placement_the_server_cannot_give_is_refused(admin):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(RemoteError, match="INVALID_ARGUMENT.*no CUDA GPU"):
        admin.deploy("on_gpu", "tiny", device="cuda:0")
    assert "on_gpu" not in _models(admin)


def test_a_job_for_a_loading_model_is_refused_or_waits(admin, client_config, llm):
    table = client_config.hub.models
    loaded = threading.Event()

    def load():
        assert loaded.wait(WAIT), "the test never let the model load"
        return tiny.tiny_gpt2()

    table.deploy("slow", load, spec="tiny (held by the test)", placement=Placement())
    remote = LanguageModel(llm._module, tokenizer=llm.tokenizer)  # the same structure, run as "slow"
    wait, table.loading_wait = table.loading_wait, 0.0
    try:
        info = _models(admin)["slow"]
        assert info.state == models_pb2.MODEL_STATE_LOADING and "loading tiny" in info.state_message
        with pytest.raises(RemoteError, match="'slow' is still loading"):
            _logits(remote, remote=True, model_name="slow")
        table.loading_wait = WAIT
        results = {}
        job = threading.Thread(target=lambda: results.update(r=_logits(remote, remote=True, model_name="slow")))
        job.start()
        loaded.set()
        job.join(WAIT)
        assert torch.equal(results["r"], _logits(llm))
    finally:
        table.loading_wait = wait
        loaded.set()
        table.wait("slow", WAIT)
        admin.evict("slow")


def test_jobs_lists_everyones_jobs_and_cancel_stops_any_of_them(admin, client_config):
    GATED.entered.clear()
    GATED.gate.clear()
    model = NNsight(Gated())  # the same structure as the served GATED
    x = torch.ones(1, 2)
    try:
        with model.trace(x, remote=True, blocking=False, model_name="gated") as running:
            model.layer.output.save()
        assert GATED.entered.wait(WAIT)
        with model.trace(x, remote=True, blocking=False, model_name="gated") as queued:
            model.layer.output.save()
        jobs = {j.job.job_id: j for j in admin.jobs()}
        assert jobs[running.job_id].job.status.state == jobs_pb2.JOB_STATE_RUNNING
        assert jobs[queued.job_id].job.status.state == jobs_pb2.JOB_STATE_QUEUED
        assert jobs[queued.job_id].owner == "loopback" and jobs[queued.job_id].job.model == "gated"
        assert _models(admin)["gated"].queue_depth == 1
        assert admin.stop(queued.job_id, "not now") == jobs_pb2.JOB_STATE_CANCELLED
        with pytest.raises(RemoteError, match="not now"):
            RemoteBackend(job_id=queued.job_id).result(timeout=WAIT)
        assert queued.job_id not in {j.job.job_id for j in admin.jobs()}
        assert queued.job_id in {j.job.job_id for j in admin.jobs(include_finished=True)}
        GATED.gate.set()
        RemoteBackend(job_id=running.job_id).result(timeout=WAIT)
        assert admin.jobs(model="gated") == []
        with pytest.raises(RemoteError, match="NOT_FOUND"):
            admin.stop("no-such-job")
    finally:
        GATED.gate.set()


def test_evict_cancels_the_models_queued_and_running_jobs(admin, client_config):
    admin.deploy("gated2", "tests.integration.test_operator:Gated", wait=WAIT)
    served_gated = client_config.hub.models.resolve("gated2").module  # built on the server by the factory
    model = NNsight(Gated())
    x = torch.ones(1, 2)
    try:
        with model.trace(x, remote=True, blocking=False, model_name="gated2") as first:
            model.layer.output.save()
        assert served_gated.entered.wait(WAIT)
        with model.trace(x, remote=True, blocking=False, model_name="gated2") as second:
            model.layer.output.save()
        assert admin.evict("gated2", "maintenance") == 2
        with pytest.raises(RemoteError, match="maintenance"):
            RemoteBackend(job_id=second.job_id).result(timeout=WAIT)
        served_gated.gate.set()  # the running job stops at its next module boundary
        with pytest.raises(RemoteError, match="maintenance"):
            RemoteBackend(job_id=first.job_id).result(timeout=WAIT)
    finally:
        served_gated.gate.set()


def test_admin_calls_need_an_admin_key(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# researchers\nuser-key-0001\n# operators\nadmin-key-0002 admin\n")
    assert read_keys(keys) == {"user-key-0001", "admin-key-0002"}
    assert read_keys(keys, role="admin") == {"admin-key-0002"}
    with start_server({"tiny": tiny.tiny_gpt2()}, api_keys=keys) as handle:
        with Admin(handle.address, "user-key-0001") as user:
            assert [m.name for m in user.models()] == ["tiny"]  # describing models needs no admin
            for call in (user.jobs, lambda: user.deploy("x", "tiny"), lambda: user.evict("tiny"),
                         lambda: user.stop("any")):
                with pytest.raises(RemoteError, match="PERMISSION_DENIED.*admin API key"):
                    call()
        with Admin(handle.address, "admin-key-0002") as operator:
            assert operator.jobs() == []
        with Admin(handle.address, None) as nobody, pytest.raises(RemoteError, match="UNAUTHENTICATED"):
            nobody.jobs()
    bad = tmp_path / "bad"
    bad.write_text("key-0003 root\n")
    with pytest.raises(ValueError, match="bad:1: unknown role 'root'"):
        read_keys(bad)


def test_an_unreachable_server_is_reported_clearly():
    with Admin("127.0.0.1:1", timeout=10) as admin, pytest.raises(RemoteError, match="is `tether serve` running"):
        admin.models()


def test_a_deploy_gets_the_servers_default_placement():
    with start_server({"tiny": tiny.tiny_gpt2()}, placement=Placement(dtype=torch.bfloat16)) as handle:
        with Admin(handle.address) as admin:
            assert admin.deploy("a", "tiny", wait=WAIT).data_type == values_pb2.DATA_TYPE_BFLOAT16
            assert admin.deploy("b", "tiny", dtype=torch.float32, wait=WAIT).data_type == values_pb2.DATA_TYPE_FLOAT32
