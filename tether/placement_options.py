"""Where a model should live, as the `tether` command names it: the `Placement` (device, dtype, device map)
and the per-model CLI options that build it (`--model NAME=SPEC` with `--device/--dtype/--device-map` after
it, or before any `--model` for all). Shared by `tether serve` (server) and `tether deploy` (client).

Applying a placement to a loaded model is the server's (server/placement.py). Imports torch and
tether.loading (dtype names); nothing of the client, the server or grpc.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch

from tether.loading import parse_dtype

__all__ = ["DEVICES", "Placement", "ModelArg", "model_arg", "add_placement_options"]

DEVICES = "cpu, cuda, cuda:N or auto"


@dataclass(frozen=True)
class Placement:
    """How to place one model: None keeps what loading gave (the CPU, the checkpoint's dtype)."""

    device: str | None = None  # "cpu", "cuda:N", "auto" (the first GPU if there is one, else the CPU)
    dtype: torch.dtype | None = None  # the parameters' dtype (bfloat16, float16, float32)
    device_map: str | None = None  # "auto": spread the model over this node's GPUs with accelerate

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


@dataclass
class ModelArg:
    """One `--model NAME=SPEC` and the placement options that followed it."""

    name: str
    spec: str
    placement: Placement


def model_arg(text: str) -> tuple[str, str]:
    """`NAME=SPEC` as (name, spec); an argparse error naming the expected form otherwise."""
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
