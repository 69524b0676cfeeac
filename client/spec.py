"""Build a model a server hosts from its ModelSpec alone: a meta-device module tree and its tokenizer.

So `LanguageModel("tiny")` works on a machine with no files for it: `print(model)` shows the server's
modules and `model.tokenizer` encodes and decodes locally. Runs nothing but transformers' constructors.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import grpc
import torch

from tether.runtime.errors import RemoteError, TetherError
from tether.v1 import models_pb2

from .channel import auth_metadata, connect, resolve_api_key
from .errors import from_rpc_error

__all__ = ["load_remote_spec", "fetch_spec", "module_from_spec", "tokenizer_from_spec"]

SPEC_TIMEOUT_S = 10.0  # seconds to wait for GetModel


def fetch_spec(name: str, host: str | None = None, api_key: str | None = None) -> models_pb2.ModelSpec | str:
    """The server's ModelSpec of `name`, or a sentence saying why there is none: no server answers at
    `host` (default CONFIG.API.HOST), or the server there hosts other models."""
    conn = connect(host)
    metadata = auth_metadata(resolve_api_key(api_key))
    try:
        response = conn.unary(conn.models.GetModel, models_pb2.GetModelRequest(name=name), metadata,
                              timeout=SPEC_TIMEOUT_S)
    except grpc.RpcError as error:
        code = error.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return f"no tether server answered at {conn.host}"
        if code is grpc.StatusCode.NOT_FOUND:
            try:
                listed = conn.unary(conn.models.ListModels, models_pb2.ListModelsRequest(), metadata, timeout=5.0)
                hosted = ", ".join(m.name for m in listed.models) or "none"
            except grpc.RpcError:
                hosted = "unknown"
            return f"the tether server at {conn.host} does not host it (it hosts: {hosted})"
        raise from_rpc_error(error, conn.host) from None
    return response.spec


def load_remote_spec(name: str, host: str | None = None, api_key: str | None = None
                     ) -> tuple[torch.nn.Module, Any, dict[str, str]] | str:
    """`(meta module, tokenizer or None, the aliases the server declares)` for a model hosted at `host`
    (default CONFIG.API.HOST), or why not."""
    spec = fetch_spec(name, host, api_key)
    if isinstance(spec, str):
        return spec
    return module_from_spec(spec), tokenizer_from_spec(spec), {a.alias_path: a.path for a in spec.aliases}


def module_from_spec(spec: models_pb2.ModelSpec) -> torch.nn.Module:
    """A parameter-free-to-allocate copy of the hosted module tree: the Hugging Face model on the meta
    device when the config rebuilds exactly the server's modules, else a skeleton of named placeholders."""
    if spec.config_json:
        module = _from_config(spec.config_json)
        if module is not None and _tree(module) == [(m.path, m.class_name) for m in spec.modules]:
            return module.eval()
    return _skeleton(spec)


def tokenizer_from_spec(spec: models_pb2.ModelSpec) -> Any:
    if not spec.tokenizer_files:
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="tether-tokenizer-") as tmp:
        for filename, data in spec.tokenizer_files.items():
            if os.path.basename(filename) != filename or filename.startswith("."):
                raise RemoteError(f"the server sent a tokenizer file with an unsafe name: {filename!r}")
            with open(os.path.join(tmp, filename), "wb") as f:
                f.write(data)
        if spec.config_json and "config.json" not in spec.tokenizer_files:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write(spec.config_json)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def _from_config(config_json: str) -> torch.nn.Module | None:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with tempfile.TemporaryDirectory(prefix="tether-config-") as tmp:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write(config_json)
            config = AutoConfig.from_pretrained(tmp, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError, json.JSONDecodeError):
        return None  # an architecture this transformers does not know: fall back to the skeleton


def _tree(module: torch.nn.Module) -> list[tuple[str, str]]:
    return [(path, type(m).__name__) for path, m in module.named_modules()]


class _SpecModule(torch.nn.Module):
    """A hosted module's stand-in: its class name and extra_repr as the server printed them, no weights."""

    def __init__(self, class_name: str, extra: str):
        super().__init__()
        self._class_name, self._extra = class_name, extra

    def _get_name(self) -> str:
        return self._class_name

    def extra_repr(self) -> str:
        return self._extra

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TetherError(
            f"{self._class_name} came from a server's model description and has no weights here: "
            "run the model with `remote=True`."
        )


class _SpecList(_SpecModule):
    """A stand-in for a ModuleList / Sequential of numbered children: indexable like one."""

    def __getitem__(self, index: int | slice) -> Any:
        children = list(self._modules.values())
        return children[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


def _skeleton(spec: models_pb2.ModelSpec) -> torch.nn.Module:
    nodes = list(spec.modules)
    if not nodes:
        raise RemoteError(f"the server described model {spec.info.name!r} with no modules")
    children: dict[str, list[str]] = {}
    for node in nodes[1:]:
        parent = node.path.rpartition(".")[0]
        children.setdefault(parent, []).append(node.path)
    built: dict[str, torch.nn.Module] = {}
    for node in nodes:
        kids = [p.rpartition(".")[2] for p in children.get(node.path, [])]
        numbered = bool(kids) and all(k.isdigit() for k in kids)
        built[node.path] = (_SpecList if numbered else _SpecModule)(node.class_name, node.extra_repr)
    for node in nodes[1:]:
        parent, _, leaf = node.path.rpartition(".")
        built[parent].add_module(leaf, built[node.path])
    return built[nodes[0].path]
