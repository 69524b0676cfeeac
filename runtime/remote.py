"""The seam through which a context marked `remote=True` hands itself to a remote backend.

The engine cannot import the client (no networking here); the `tether` facade registers the client's
runner with `set_runner`, and `run_remote` calls it with the captured context and the caller's names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .errors import TetherError

__all__ = ["set_runner", "run_remote", "set_spec_loader", "load_spec", "remote_output"]

_runner: Callable[[Any, dict], None] | None = None


def set_runner(runner: Callable[[Any, dict], None]) -> None:
    """Install the function that runs a captured context remotely and fills `ns` with its results."""
    global _runner
    _runner = runner


def run_remote(context: Any, ns: dict) -> None:
    if _runner is None:
        raise TetherError("No remote backend is installed: import `tether` (not only `tether.runtime`).")
    _runner(context, ns)


_spec_loader: Callable[..., tuple[Any, Any, Any] | str] | None = None


def set_spec_loader(loader: Callable[..., tuple[Any, Any, Any] | str]) -> None:
    """Install `loader(name, host=, api_key=)`: `(meta module, tokenizer, declared aliases)` for a model a
    server hosts, or a sentence saying why not (no server answered at the address, or it hosts other
    models)."""
    global _spec_loader
    _spec_loader = loader


def load_spec(name: str, host: str | None = None, api_key: str | None = None) -> tuple[Any, Any, Any] | str:
    """A model skeleton and its declared aliases from the server at `host` (default CONFIG.API.HOST), or
    why there is none."""
    if _spec_loader is None:
        return "no remote backend is installed (import `tether`, not only `tether.runtime`)"
    return _spec_loader(name, host=host, api_key=api_key)


_OUTPUT_SOURCE = "output = model.output.save()\n"


def remote_output(model: Any, tracer: Any) -> Any:
    """`model.trace(x, trace=False, remote=True)`: the model's output, computed on the server."""
    from .program import Program, block_of
    from .saving import SavedTensor

    tracer._block = block_of(Program(kind="trace", source=_OUTPUT_SOURCE, filename="<trace=False>", first_line=1))
    ns = {"model": model}
    run_remote(tracer, ns)
    output = ns["output"]
    return output.as_subclass(torch.Tensor) if isinstance(output, SavedTensor) else output
