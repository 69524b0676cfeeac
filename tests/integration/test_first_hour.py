"""A new user's first steps: where the server is, keywords on the model, local loading by SPEC name.

Each test runs its own loopback server (OS-assigned port) or none, and compares with a local run.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import runpy
import socket
import sys
import threading
from pathlib import Path

import pytest
import torch

import tether
from tether import CONFIG, LanguageModel, NNsight, tiny
from tether.client.channel import close_all
from tether.server.app import start_server
from tether.server.cli import default_port_start
from tether.v1 import jobs_pb2


@pytest.fixture
def no_server(monkeypatch, tmp_path):
    """CONFIG points at a loopback port where nothing listens; no key or host from the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("TETHER_HOST", raising=False)
    monkeypatch.delenv("TETHER_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "_host", f"127.0.0.1:{port}")
    monkeypatch.setattr(CONFIG.API, "_api_key", None)
    yield f"127.0.0.1:{port}"
    close_all()


def _ids(model: LanguageModel, prompt: str = "The quick brown fox") -> torch.Tensor:
    with model.trace(prompt):
        out = model.output.logits.save()
    return out


# ---- 1. one default address -------------------------------------------------------------------------


def test_serve_listens_where_clients_look_and_says_so(no_server, capsys):
    start = functools.partial(start_server, {"net": tiny.tiny_net()}, "127.0.0.1")
    with default_port_start(start) as first:
        assert first.address == no_server
        assert "where clients look by default" in capsys.readouterr().err
        with default_port_start(start) as second:  # the default port is taken now: any free one, and why
            assert second.address != no_server
            err = capsys.readouterr().err
            assert "is taken" in err and f"TETHER_HOST={second.address}" in err


def test_no_server_errors_name_the_address_and_how_to_start_one(no_server):
    with pytest.raises(tether.TetherError, match=f"no tether server answered at {no_server}.*tether serve"):
        LanguageModel("not-a-model-anywhere")
    net = NNsight(tiny.tiny_net())
    with pytest.raises(tether.RemoteError, match=f"No tether server answered at {no_server}.*tether serve"):
        with net.trace(torch.rand(1, 5), remote=True, model_name="net"):
            net.output.save()


# ---- 2. keywords on the model -----------------------------------------------------------------------


def test_model_level_host_and_api_key_reach_the_spec_and_every_trace(no_server):
    with start_server({"tiny": tiny.tiny_gpt2()}, host="127.0.0.1", port=0, api_keys=["sesame"]) as keyed:
        with pytest.raises(tether.RemoteError, match="refused the API key"):
            LanguageModel("tiny", host=keyed.address)  # the spec fetch carries the key: none here
        remote = LanguageModel("tiny", host=keyed.address, api_key="sesame")
        assert all(p.device.type == "meta" for p in remote._module.parameters())
        with remote.trace("The quick brown fox", remote=True):
            out = remote.output.logits.save()
        by_backend = LanguageModel("tiny", backend=keyed.address, api_key="sesame")
        with by_backend.trace("The quick brown fox", remote=True):
            again = by_backend.output.logits.save()
    local = _ids(LanguageModel(*tiny.tiny_gpt2()[:1], tokenizer=tiny.tiny_gpt2()[1]))
    assert torch.equal(out, local) and torch.equal(again, local)


def test_unknown_keywords_raise_type_error_and_loader_keywords_still_load(tmp_path):
    with pytest.raises(TypeError, match="'bogus'.*api_key="):
        NNsight(tiny.tiny_net(), bogus=1)
    model, tok = tiny.tiny_gpt2()
    with pytest.raises(TypeError, match="'api_kye'"):
        LanguageModel(model, tokenizer=tok, api_kye="x")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="'torch_dytpe'"):
        LanguageModel(str(tmp_path), torch_dytpe=torch.float64)
    loaded = LanguageModel(str(tmp_path), torch_dtype=torch.float64, dispatch=True)  # a from_pretrained keyword
    assert {p.dtype for p in loaded._module.parameters()} == {torch.float64}
    via_config = LanguageModel(str(tmp_path), use_cache=False)  # a config attribute, as from_pretrained takes
    assert torch.equal(_ids(via_config), _ids(LanguageModel(model, tokenizer=tok)))


# ---- 7. SPEC names load here when no server hosts them -----------------------------------------------


def test_spec_names_load_locally_when_no_server_hosts_them(no_server):
    local = LanguageModel("tiny")
    assert not any(p.device.type == "meta" for p in local._module.parameters())
    model, tok = tiny.tiny_gpt2()
    assert torch.equal(_ids(local), _ids(LanguageModel(model, tokenizer=tok)))
    net = LanguageModel("tether.tiny:tiny_gpt2")  # module:factory, as `tether serve` takes it
    assert torch.equal(_ids(net), _ids(local))


# ---- 3. progress; 6. fetches; 8. the server's job log -----------------------------------------------


class _Terminal(io.StringIO):
    """stderr as a terminal: the status line is redrawn in place, every redraw kept here."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def served(no_server, monkeypatch):
    with start_server({"tiny": tiny.tiny_gpt2()}, host="127.0.0.1", port=0) as handle:
        monkeypatch.setattr(CONFIG.API, "_host", handle.address)
        yield handle


def test_generation_shows_steps_and_the_line_never_goes_back(served, monkeypatch, caplog):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    llm = LanguageModel("tiny")
    with caplog.at_level(logging.INFO, logger="tether.server"):
        with llm.generate("Hello", max_new_tokens=5, remote=True):
            out = llm.generator.output.save()
    model, tok = tiny.tiny_gpt2()
    local = LanguageModel(model, tokenizer=tok)
    with local.generate("Hello", max_new_tokens=5):
        expected = local.generator.output.save()
    assert torch.equal(out, expected)
    frames = [f for f in re.split(r"\r\x1b\[2K", re.sub(r"\x1b\[[0-9;]*m", "", terminal.getvalue())) if f.strip()]
    assert any("step 3/5" in f for f in frames) and "step 5/5" in frames[-2] and "COMPLETED" in frames[-1]
    order = ["SUBMITTING", "RECEIVED", "QUEUED", "DISPATCHED", "RUNNING", "COMPLETED"]
    shown = [next(i for i, s in enumerate(order) if f" {s} " in f) for f in frames]
    assert shown == sorted(shown)  # never back to an earlier state
    line = next(r.getMessage() for r in caplog.records if "model=tiny" in r.getMessage())
    assert re.search(r"job \w+ model=tiny key=loopback COMPLETED queued=\d+\.\d\ds ran=\d+\.\d\ds", line)
    assert "result of 85 bytes" in line or "bytes" in line or "KiB" in line


def test_a_fetched_job_shows_its_real_run_time(served, capsys):
    llm = LanguageModel("tiny")
    with llm.generate("Hello", max_new_tokens=40, remote=True, blocking=False) as tracer:
        out = llm.generator.output.save()
    backend = tracer.backend
    job = served.hub.store.get(backend.job_id, "loopback")
    capsys.readouterr()
    with llm.generate("Hello", max_new_tokens=40, remote=True, backend=backend, blocking=True):
        out = llm.generator.output.save()
    final = capsys.readouterr().err.strip().splitlines()[-1]
    shown = float(re.search(r"COMPLETED (\d+\.\d)s", final).group(1))
    times = job.state_times
    real = times[jobs_pb2.JOB_STATE_COMPLETED] - times[jobs_pb2.JOB_STATE_RECEIVED]
    assert abs(shown - real) <= 0.06, (final, real)  # the job's time on the server, not the fetch's
    assert out.shape[1] == len(llm.tokenizer("Hello")["input_ids"]) + 40


def test_result_then_the_same_block_again_fills_names_without_a_second_job(served):
    llm = LanguageModel("tiny")
    jobs, backend = len(served.hub.store), None
    for attempt in range(2):
        with llm.trace("Hello", remote=True, blocking=False, backend=backend) as tracer:
            logits = llm.output.logits.save()
        if attempt == 0:
            backend = tracer.backend
            assert "PendingValue 'logits'" in repr(logits) and backend.job_id in repr(logits)
            values = backend.result()
    assert len(served.hub.store) == jobs + 1  # the second run of the block fetched; it submitted nothing
    assert torch.equal(logits, values["logits"])
    model, tok = tiny.tiny_gpt2()
    assert torch.equal(logits, _ids(LanguageModel(model, tokenizer=tok), "Hello"))


ASYNC_SCRIPT = '''
import asyncio
from tether.client.aio import AsyncBackend

backend = AsyncBackend()
with llm.trace("Hello", remote=True, backend=backend):
    logits = llm.output.logits.save()
pending = repr(logits)


async def main():
    return await backend

values = asyncio.run(main())
'''


def test_await_fills_the_names_of_a_module_level_block(served, tmp_path):
    script = tmp_path / "notebook_like.py"
    script.write_text(ASYNC_SCRIPT)
    ns = runpy.run_path(str(script), init_globals={"llm": LanguageModel("tiny")})
    assert "await backend" in ns["pending"]
    assert torch.equal(ns["logits"], ns["values"]["logits"])
    model, tok = tiny.tiny_gpt2()
    assert torch.equal(ns["logits"], _ids(LanguageModel(model, tokenizer=tok), "Hello"))


def test_queued_behind_counts_the_running_job_and_the_end_says_how_long_it_queued(served, capsys):
    llm = LanguageModel("tiny")
    started, release = threading.Event(), threading.Event()

    def first_job():
        with llm.trace("Hello", remote=True):
            llm.transformer.h[0].output.save()
            with tether.local():  # holds the only worker until the test lets go
                started.set()
                release.wait(30)

    thread = threading.Thread(target=first_job)
    thread.start()
    try:
        assert started.wait(30)
        with llm.trace("Hello", remote=True, blocking=False) as tracer:
            llm.output.logits.save()
        queued = served.hub.store.get(tracer.backend.job_id, "loopback").status.message
    finally:
        release.set()
        thread.join(30)
    assert queued == "queued behind 1 job (1 running, 0 waiting)"
    capsys.readouterr()
    tracer.backend.result(timeout=30)
    final = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"COMPLETED \d+\.\ds +\(queued \d+\.\ds, ran \d+\.\ds\)", final), final


# ---- 9. the allow-list and --allow-module -------------------------------------------------------------


def test_allow_module_extends_the_servers_allow_list(no_server):
    from tether.cli import parse_args
    from tether.server.policy import DEFAULT_POLICY

    args = parse_args(["serve", "--model", "net=tiny", "--allow-module", "json"])
    x = torch.rand(1, 5)
    net = NNsight(tiny.tiny_net())
    for policy, allowed in ((DEFAULT_POLICY, False), (DEFAULT_POLICY.with_modules(args.allow_module), True)):
        with start_server({"net": tiny.tiny_net()}, host="127.0.0.1", port=0, policy=policy) as server:
            if not allowed:
                with pytest.raises(tether.RemoteError, match="module 'json' is not on its allow-list"):
                    with net.trace(x, remote=True, model_name="net", backend=server.address):
                        import json
                        text = tether.save(json.dumps([1, 2]))
                continue
            with net.trace(x, remote=True, model_name="net", backend=server.address):
                import json
                text = tether.save(json.dumps([1, 2]))
    assert text == "[1, 2]"


# ---- 7. the README's first screen runs as written -------------------------------------------------------


@pytest.mark.slow
def test_the_readmes_local_smollm2_trace_runs_as_written(no_server, tmp_path, capsys, smollm2):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    first = re.search(r"## A first trace, on your machine\n\n```python\n(.*?)```", readme, re.S).group(1)
    script = tmp_path / "first_trace.py"
    script.write_text(first)
    ns = runpy.run_path(str(script))
    assert capsys.readouterr().out.strip() == "Paris"
    model, tok = smollm2  # the reference: plain torch, the same edit by a hook
    batch = tok("The Eiffel Tower is in the city of", return_tensors="pt")

    def halve_last(module, args, output):
        output[:, -1] *= 0.5

    handle = model.model.layers[10].mlp.register_forward_hook(halve_last)
    try:
        with torch.no_grad():
            expected = model(**batch).logits
    finally:
        handle.remove()
    assert torch.equal(ns["logits"], expected)


def test_a_refused_program_does_not_leave_submitting_on_the_status_line(served, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    llm = LanguageModel("tiny")
    with pytest.raises(tether.RemoteError, match="refused to run the program"):
        with llm.trace("Hello", remote=True):
            import json
            tether.save(json.dumps([1]))
    last = re.sub(r"\x1b\[[0-9;]*m", "", terminal.getvalue()).split("\r\x1b[2K")[-1]
    assert " ERROR " in last and "not completed" in last and "SUBMITTING" not in last


def test_a_served_spec_name_also_runs_here_after_loading_it_locally(served):
    llm = LanguageModel("tiny")  # the server's module tree: no weights here yet
    assert all(p.device.type == "meta" for p in llm._module.parameters())
    local = _ids(llm)  # a local trace loads `tiny` here, as `tether serve` would
    with llm.trace("The quick brown fox", remote=True):  # and the name still names the served model
        remote = llm.output.logits.save()
    model, tok = tiny.tiny_gpt2()
    assert torch.equal(local, _ids(LanguageModel(model, tokenizer=tok))) and torch.equal(remote, local)
