"""Where a hosted model lives: its device, dtype and device map (`--device/--dtype/--device-map`), applied
once it is loaded, and the per-model CLI options that name them. Imports torch (accelerate lazily for a
device map) and tether.runtime; nothing of grpc or jobs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any

import torch

from tether.runtime.loading import parse_dtype
from tether.runtime.model import NNsight

__all__ = ["Placement", "ModelArg", "model_arg", "add_placement_options", "place", "resolve_device"]

DEVICES = "cpu, cuda, cuda:N or auto"


@dataclass(frozen=True)
class Placement:
    """How to place one model: None keeps what loading gave (the CPU, the checkpoint's dtype)."""

    device: str | None = None  # "cpu", "cuda:N", "auto" (the first GPU if there is one, else the CPU)
    dtype: torch.dtype | None = None  # the parameters' dtype (bfloat16, float16, float32)
    device_map: str | None = None  # "auto": spread the model over this node's GPUs with accelerate

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """What Hugging Face's from_pretrained takes for this placement: the dtype, and a device map (loads
        straight to the GPUs; needs accelerate). One device is left to `place`, which needs nothing more."""
        kwargs: dict[str, Any] = {}
        if self.dtype is not None:
            kwargs["dtype"] = self.dtype
        if self.device_map is not None:
            _need_accelerate(self.device_map)
            kwargs["device_map"] = self.device_map
        return kwargs

    def over(self, default: Placement) -> Placement:
        """This placement, with what it leaves unset taken from `default` (a server's defaults)."""
        where = (self.device, self.device_map) if self.device or self.device_map else (default.device,
                                                                                        default.device_map)
        return Placement(device=where[0], dtype=self.dtype or default.dtype, device_map=where[1])

    def describe(self) -> str:
        parts = [f"device_map={self.device_map}" if self.device_map else f"device={self.device or 'cpu'}"]
        if self.dtype is not None:
            parts.append(f"dtype={str(self.dtype).removeprefix('torch.')}")
        return ", ".join(parts)


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


def place(obj: Any, placement: Placement) -> Any:
    """`obj` (a torch module, a `(model, tokenizer)` pair or an NNsight) with its module in `placement`:
    cast to the dtype, then moved to the device, or spread over the GPUs for `device_map="auto"`."""
    module = obj._module if isinstance(obj, NNsight) else obj[0] if isinstance(obj, tuple) else obj
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


# ---- the CLI: options that follow a --model apply to it, those before any --model to all ------------------
@dataclass
class ModelArg:
    """One `--model NAME=SPEC` and the placement options that followed it."""

    name: str
    spec: str
    placement: Placement


def model_arg(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"expected NAME=SPEC (e.g. tiny=tiny or smollm2=smollm2), got {text!r}")
    return name, spec


def _dtype_arg(text: str) -> torch.dtype:
    try:
        return parse_dtype(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class _ModelAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        name, spec = values
        defaults = getattr(namespace, "placement", None) or Placement()
        namespace.models = [*(getattr(namespace, "models", None) or []), ModelArg(name, spec, defaults)]


class _PlacementAction(argparse.Action):
    """--device/--dtype/--device-map: on the last --model, or the default for all before any --model."""

    def __call__(self, parser, namespace, values, option_string=None):
        models = getattr(namespace, "models", None) or []
        if models:
            models[-1].placement = replace(models[-1].placement, **{self.dest: values})
        else:
            namespace.placement = replace(getattr(namespace, "placement", None) or Placement(), **{self.dest: values})


def add_placement_options(parser: argparse.ArgumentParser, *, with_model: bool) -> None:
    """--device, --dtype, --device-map (and, for `tether serve`, --model NAME=SPEC, repeatable).

    Parsed into `args.models` (a list of ModelArg, with_model) or `args.placement` (a Placement)."""
    parser.set_defaults(placement=Placement(), **({"models": []} if with_model else {}))
    if with_model:
        parser.add_argument("--model", action=_ModelAction, type=model_arg, metavar="NAME=SPEC",
                            help="a model to host; SPEC: tiny, smollm2, a local directory, a Hugging Face id in "
                                 "the local cache, or module:factory (returns a torch module or (model, "
                                 "tokenizer)); repeat for several models. --device/--dtype/--device-map after "
                                 "a --model apply to it; before any --model, to all")
    parser.add_argument("--device", action=_PlacementAction, metavar="DEVICE",
                        help=f"where the model runs: {DEVICES} (default: as loaded, the CPU)")
    parser.add_argument("--dtype", action=_PlacementAction, type=_dtype_arg, metavar="DTYPE",
                        help="the parameters' dtype: bfloat16, float16 or float32 (default: as loaded)")
    parser.add_argument("--device-map", action=_PlacementAction, choices=["auto"], dest="device_map",
                        help="`auto`: spread one model over this node's GPUs (accelerate)")
