"""Applying a hosted model's placement (its device, dtype and device map, `--device/--dtype/--device-map`):
what from_pretrained takes for it, and the cast and move once it is loaded. The Placement itself and the
CLI options that name it are tether/placement_options.py's. Imports torch (accelerate lazily for a device
map) and tether.runtime; nothing of grpc or jobs.
"""

from __future__ import annotations

from typing import Any

import torch

from tether.placement_options import DEVICES, Placement
from tether.runtime.envoy import Envoy, module_of

__all__ = ["from_pretrained_kwargs", "place", "resolve_device"]


def from_pretrained_kwargs(placement: Placement) -> dict[str, Any]:
    """What Hugging Face's from_pretrained takes for `placement`: the dtype, and a device map (loads straight
    to the GPUs; needs accelerate). One device is left to `place`, which needs nothing more."""
    kwargs: dict[str, Any] = {}
    if placement.dtype is not None:
        kwargs["dtype"] = placement.dtype
    if placement.device_map is not None:
        _need_accelerate(placement.device_map)
        kwargs["device_map"] = placement.device_map
    return kwargs


def resolve_device(device: str) -> torch.device:
    """The torch device `--device` names; a clear error for a GPU this machine does not have."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: give {DEVICES}") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no CUDA GPU (torch.cuda.is_available() is "
                             "False); use --device cpu, or --device auto to take a GPU only where there is one")
        index = resolved.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from cuda:0")
    elif resolved.type != "cpu":
        raise ValueError(f"unsupported device {device!r}: give {DEVICES}")
    return resolved


def module_in(obj: Any) -> Any:
    """The torch module inside what a model source returns (a module, a `(model, tokenizer)` pair or an
    NNsight); `obj` itself when it holds none."""
    if isinstance(obj, tuple):
        obj = obj[0]
    return module_of(obj) if isinstance(obj, Envoy) else obj


def place(obj: Any, placement: Placement) -> Any:
    """`obj` (a torch module, a `(model, tokenizer)` pair or an NNsight) with its module in `placement`:
    cast to the dtype, then moved to the device, or spread over the GPUs for `device_map="auto"`."""
    module = module_in(obj)
    if not isinstance(module, torch.nn.Module):
        return obj  # wrap() reports what it is
    if placement.dtype is not None:
        module.to(dtype=placement.dtype)
    if placement.device_map is not None:
        if getattr(module, "hf_device_map", None) is None:  # (from_pretrained placed it already)
            _dispatch(module, placement.device_map)
    elif placement.device is not None:
        module.to(resolve_device(placement.device))
    return obj


def _need_accelerate(device_map: str) -> None:
    if device_map != "auto":
        raise ValueError(f"--device-map {device_map!r}: only `auto` is supported (or give --device)")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ValueError("--device-map auto spreads a model with the `accelerate` package, which is not "
                         "installed here: `pip install accelerate` (or give --device instead)") from None


def _dispatch(module: torch.nn.Module, device_map: str) -> None:
    _need_accelerate(device_map)
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = getattr(module, "_no_split_modules", None)
    memory = get_balanced_memory(module, no_split_module_classes=no_split)
    dispatch_model(module, infer_auto_device_map(module, max_memory=memory, no_split_module_classes=no_split))
