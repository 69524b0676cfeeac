"""The hosted models: loading a `--model NAME=SPEC`, wrapping it, and describing it (ModelInfo, ModelSpec).

Imports torch, transformers (lazily), tether.runtime and tether.v1; nothing of grpc or jobs.
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch

from tether.placement_options import Placement
from tether.runtime.envoy import module_of
from tether.runtime.model import NNsight, over_module
from tether.runtime.rename import declared as declared_aliases
from tether.v1 import models_pb2, values_pb2
from tether.values import to_value

from .errors import NotFound
from .placement import from_pretrained_kwargs, place

__all__ = ["HostedModel", "Registry", "load_model", "structure_of", "wrap"]

def load_model(spec: str, placement: Placement | None = None) -> Any:
    """The object a `--model NAME=SPEC` names (see tether.loading.load_named), in `placement` (its
    device, dtype or device map; a directory or a cached id loads straight into it)."""
    from tether.loading import load_named

    placement = placement or Placement()
    return place(load_named(spec, **from_pretrained_kwargs(placement)), placement)


def wrap(obj: Any) -> NNsight:
    """The root NNsight of a hosted model: a LanguageModel when it has a tokenizer or is a HF causal LM."""
    if isinstance(obj, NNsight):
        return obj
    tokenizer = None
    if isinstance(obj, tuple) and len(obj) == 2:
        obj, tokenizer = obj
    if not isinstance(obj, torch.nn.Module):
        raise TypeError(
            f"a hosted model must be a torch module or a (model, tokenizer) pair, not {type(obj).__name__}"
        )
    if tokenizer is not None or _is_causal_lm(obj):
        from tether.runtime.language_model import LanguageModel

        return LanguageModel(obj, tokenizer=tokenizer)
    return NNsight(obj)


def _is_causal_lm(module: torch.nn.Module) -> bool:
    if "transformers" not in sys.modules:  # a Hugging Face model's class imported it (importing it costs seconds)
        return False
    try:
        from transformers import GenerationMixin, PreTrainedModel
    except ImportError:
        return False
    return isinstance(module, PreTrainedModel) and isinstance(module, GenerationMixin)


def structure_of(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose parameters and buffers are on torch's meta device: its module tree, config,
    names, shapes and dtypes, no weights. What a cluster's front door keeps of a model (it checks programs and
    describes the model; the replicas run it). The original is untouched; tied weights stay tied; tensors the
    module holds as plain attributes are copied as they are."""
    memo: dict[int, Any] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (torch.nn.Parameter(meta, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, torch.nn.Parameter) else meta)
    return deepcopy(module, memo)


class HostedModel:
    """One hosted model: its name, its root NNsight, how to load it again (`source`, when known: restores
    weights a job wrote into) and (computed once) its description."""

    def __init__(self, name: str, model: NNsight, source: Callable[[], Any] | None = None):
        self.name = name
        self.model = model
        self.source = source
        self._lock = threading.Lock()
        self._spec: models_pb2.ModelSpec | None = None  # guarded by _lock; built on the first GetModel

    @property
    def module(self) -> torch.nn.Module:
        return module_of(self.model)

    def replica(self, index: int) -> NNsight:
        """The model a worker runs: replica 0 is the model itself, others are deep copies (own weights and
        own hooks, so workers never share a module)."""
        if index == 0:
            return self.model
        return over_module(self.model, deepcopy(self.module))

    def info(self, queue_depth: int = 0, ready: bool = True) -> models_pb2.ModelInfo:
        """The model's summary (architecture, parameter count, dtype, device, queue depth, readiness)."""
        module = self.module
        params = list(module.parameters())
        counts: collections.Counter = collections.Counter()
        for p in params:
            counts[p.dtype] += p.numel()
        dtype = counts.most_common(1)[0][0] if counts else torch.get_default_dtype()
        config = getattr(module, "config", None)
        architectures = getattr(config, "architectures", None) or [type(module).__name__]
        return models_pb2.ModelInfo(
            name=self.name,
            architecture=architectures[0],
            parameter_count=sum(p.numel() for p in params),
            data_type=to_value(dtype).data_type_value,
            device=",".join(dict.fromkeys(str(p.device) for p in params)) or "cpu",  # (a device map: several)
            queue_depth=queue_depth,
            ready=ready,
        )

    def spec(self, queue_depth: int = 0, ready: bool = True) -> models_pb2.ModelSpec:
        """Everything a client needs to mirror the model: module tree, printed form, config, tokenizer."""
        with self._lock:
            if self._spec is None:
                self._spec = self._build_spec()
            spec = models_pb2.ModelSpec()
            spec.CopyFrom(self._spec)
        spec.info.CopyFrom(self.info(queue_depth, ready))
        return spec

    def _build_spec(self) -> models_pb2.ModelSpec:
        module = self.module
        nodes = [
            models_pb2.ModuleNode(
                path=path,
                class_name=type(m).__name__,
                class_module=type(m).__module__,
                extra_repr=m.extra_repr(),
            )
            for path, m in module.named_modules()
        ]
        config = getattr(module, "config", None)
        config_json = config.to_json_string() if hasattr(config, "to_json_string") else ""
        return models_pb2.ModelSpec(
            modules=nodes,
            printed=repr(module),
            config_json=config_json,
            tokenizer_files=_tokenizer_files(getattr(self.model, "tokenizer", None)),
            aliases=[values_pb2.ModuleAlias(alias_path=alias, path=path)
                     for alias, path in declared_aliases(self.model).items()],
        )


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files `tokenizer.save_pretrained` writes, by name; empty without a tokenizer."""
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        return {}
    with tempfile.TemporaryDirectory(prefix="tether-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {
            os.path.relpath(os.path.join(root, name), tmp): Path(root, name).read_bytes()
            for root, _, names in os.walk(tmp)
            for name in names
        }


class Registry:
    """The hosted models by name. Models come and go while serving (`add`, `remove`: the deployments table
    calls them); a job keeps the HostedModel it resolved."""

    def __init__(self, models: Mapping[str, Any], sources: Mapping[str, Callable[[], Any]] | None = None):
        sources = sources or {}
        unknown = set(sources) - set(models)
        if unknown:
            raise ValueError(f"sources given for models that are not hosted: {', '.join(sorted(unknown))}")
        self._lock = threading.Lock()
        # guarded by _lock (replaced, never changed in place: readers take the dict and use it unlocked)
        self._models = {name: HostedModel(name, wrap(obj), sources.get(name)) for name, obj in models.items()}

    def add(self, name: str, obj: Any, source: Callable[[], Any] | None = None) -> HostedModel:
        """Host `obj` (a module, `(model, tokenizer)` or NNsight) as `name`; ValueError if the name is taken."""
        hosted = HostedModel(name, wrap(obj), source)
        with self._lock:
            if name in self._models:
                raise ValueError(f"a model named {name!r} is already hosted")
            self._models = {**self._models, name: hosted}
        return hosted

    def remove(self, name: str, only: HostedModel | None = None) -> HostedModel | None:
        """Stop hosting `name` (if given, only while it is `only`); the HostedModel removed, or None."""
        with self._lock:
            hosted = self._models.get(name)
            if hosted is None or (only is not None and hosted is not only):
                return None
            self._models = {k: v for k, v in self._models.items() if k != name}
        return hosted

    def replace(self, name: str, old: HostedModel, new: HostedModel) -> bool:
        """Host `new` as `name` in place of `old` (False, nothing done: `name` is no longer `old`)."""
        with self._lock:
            if self._models.get(name) is not old:
                return False
            self._models = {**self._models, name: new}
        return True

    def get(self, name: str) -> HostedModel:
        """The hosted model `name`; NotFound with the names that exist otherwise."""
        models = self._models
        hosted = models.get(name)
        if hosted is None:
            raise NotFound(
                f"this server hosts no model named {name!r}; it hosts {', '.join(sorted(models)) or 'none'}. "
                "Check the model name (ListModels, or `tether models`, shows them)."
            )
        return hosted

    def names(self) -> list[str]:
        return sorted(self._models)

    def __iter__(self):
        models = self._models
        return iter([models[name] for name in sorted(models)])
