"""A new user's first steps: where the server is, keywords on the model, local loading by SPEC name.

Each test runs its own loopback server (OS-assigned port) or none, and compares with a local run.
"""

from __future__ import annotations

import functools
import socket

import pytest
import torch

import tether
from tether import CONFIG, LanguageModel, NNsight
from tether.client.channel import close_all
from tether.runtime import tiny
from tether.server.app import start_server
from tether.server.cli import default_port_start


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
    net = LanguageModel("tether.runtime.tiny:tiny_gpt2")  # module:factory, as `tether serve` takes it
    assert torch.equal(_ids(net), _ids(local))
