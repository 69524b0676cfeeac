"""Fixtures shared by the remote tests: a loopback server per module, a client pointed at it, and models."""

from __future__ import annotations

import pytest
import torch

from tether import CONFIG, LanguageModel, tiny
from tether.client.channel import close_all
from tether.server.app import start_server


@pytest.fixture(scope="module")
def server(request):
    """A real server on 127.0.0.1 with an OS-assigned port for the test module: it hosts what the module's
    `served()` returns, with its SERVER_OPTIONS; stopped (and the client's channels closed) after it."""
    handle = start_server(request.module.served(), host="127.0.0.1", port=0,
                          **getattr(request.module, "SERVER_OPTIONS", {}))
    assert handle.wait_ready(timeout=180), "the server's workers did not start"  # the first starts the forkserver
    yield handle
    handle.stop(grace=0)
    close_all()


@pytest.fixture
def client(server):
    """A raw gRPC client of the module's server (test_server.Client: the wire calls, no SDK), closed after."""
    from test_server import Client

    c = Client(server.address)
    yield c
    c.close()


@pytest.fixture
def client_config(server, tmp_path, monkeypatch):
    """Point CONFIG at the server; keep the user config file in a temp dir; no keys from the environment."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("TETHER_API_KEY", raising=False)
    monkeypatch.delenv("TETHER_HOST", raising=False)
    monkeypatch.setattr(CONFIG.API, "_host", server.address)
    monkeypatch.setattr(CONFIG.API, "_api_key", None)
    return server


@pytest.fixture
def llm():
    """The local reference: a fresh tiny GPT-2 with the same seed as the served one."""
    model, tok = tiny.tiny_gpt2()
    return LanguageModel(model, tokenizer=tok)


@pytest.fixture
def rllm(client_config):
    """The remote model, built only from the server's ModelSpec."""
    return LanguageModel("tiny")


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand((1, 5), generator=torch.Generator().manual_seed(5))
