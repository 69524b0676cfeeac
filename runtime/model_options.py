"""Which keywords a model constructor (`NNsight`, `LanguageModel`) accepts, and where each one goes.

tether's own (`api_key`, `backend`, `host`) choose the server for the model's spec and its remote traces;
Hugging Face loader keywords go to `from_pretrained`; anything else is a TypeError. Imports no client.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

__all__ = ["remote_defaults", "check_load_kwargs", "unexpected"]

OWN = ("api_key", "backend", "host")


def remote_defaults(owner: str, api_key: str | None, backend: Any, host: str | None) -> dict[str, Any]:
    """The remote options a model gives each of its traces (and its spec fetch): `backend` as "host:port"."""
    if backend is not None and host is not None:
        raise TypeError(f"{owner}() got both backend= and host=: give one (\"host:port\").")
    target = host if host is not None else backend
    if target is not None and not isinstance(target, str):
        if not hasattr(target, "host"):
            raise TypeError(f"{owner}(backend=...) takes \"host:port\" or a tether.client.RemoteBackend, "
                            f"not {type(target).__name__}.")
        api_key = api_key or getattr(target, "api_key", None)
        target = target.host
    out: dict[str, Any] = {}
    if target:
        out["backend"] = target
    if api_key:
        out["api_key"] = api_key
    return out


def unexpected(owner: str, names: list[str], accepted: tuple[str, ...], extra: str = "") -> TypeError:
    """The TypeError for keywords nobody takes, naming what is accepted."""
    listed = ", ".join(f"{n}=" for n in accepted)
    return TypeError(f"{owner}() got unexpected keyword argument(s) {', '.join(map(repr, sorted(names)))}; "
                     f"it accepts {listed}{extra}.")


@functools.lru_cache(maxsize=1)
def _hf_loader_names() -> frozenset[str]:
    """The keywords `PreTrainedModel.from_pretrained` reads itself (its parameters and the ones it pops)."""
    from transformers import PreTrainedModel

    method = PreTrainedModel.from_pretrained
    names = {n for n, p in inspect.signature(method).parameters.items()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    try:
        names |= set(re.findall(r"kwargs\.pop\(\s*[\"'](\w+)[\"']", inspect.getsource(method)))
    except (OSError, TypeError):
        pass
    names |= {"torch_dtype", "dtype", "trust_remote_code", "attn_implementation", "revision", "low_cpu_mem_usage"}
    return frozenset(names)


def check_load_kwargs(owner: str, kwargs: dict[str, Any], config: Any = None) -> None:
    """Raise TypeError for keywords neither tether nor the Hugging Face loader takes (`config`: the model's
    config, whose attributes from_pretrained also accepts as keywords)."""
    known = _hf_loader_names()
    config_keys = set(config.to_dict()) if hasattr(config, "to_dict") else set()
    wrong = [k for k in kwargs if k not in known and k not in config_keys]
    if wrong:
        raise unexpected(owner, wrong, ("tokenizer", "dispatch", "device_map", *OWN),
                         " and Hugging Face from_pretrained keywords (torch_dtype=, revision=, "
                         "attn_implementation=, ...)")
