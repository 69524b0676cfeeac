"""Program: a captured block as plain data, and the Executor that runs one against a model.

A client turns a context into a Program (source text, where it came from, inputs);
a server worker runs it with `execute`, which drives the same Tracer/Session code a local run uses.
`local()` blocks go to the handler the caller installs. Nothing here touches a network.
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..caching import bytes_lru_cache
from . import ops
from .capture import OPS_NAME, Block, find_in_text, parse, register_source
from .contexts import local_handler
from .interleaver import cancel_scope
from .saving import SaveScope, hand_back

__all__ = ["Program", "program_of", "block_of", "context_of", "execute", "free_names", "local_block_at",
           "run_local_block"]

KINDS = ("trace", "generate", "session", "scan")


@dataclass
class Program:
    """What a remote job runs: the body's source and the entry point's inputs (no pickled code)."""

    kind: str  # one of KINDS
    source: str  # the body, dedented; line 1 is line `first_line` of `filename`
    filename: str
    first_line: int
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    tracer_name: str = ""  # the `as` name of the block, bound to the server-side tracer or session
    enclosing_function: str = ""  # the function the `with` statement is in ("" at module level)


def program_of(context: Any, kind: str) -> Program:
    """The Program of a captured (entered and skipped) Tracer or Session."""
    block: Block = context.block
    target = block.target
    return Program(
        kind=kind,
        source=block.source,
        filename=block.filename,
        first_line=block.first_line,
        args=tuple(getattr(context, "_args", ())),
        kwargs={**getattr(context, "_kwargs", {}), **getattr(context, "_run_kwargs", {})},
        tracer_name=target.id if isinstance(target, ast.Name) else "",
        enclosing_function="" if block.scope == "<module>" else block.scope,
    )


def free_names(block: Block, ns: dict) -> list[str]:
    """Names the body reads that the caller's namespace defines (what a remote run must be sent)."""
    return sorted(n for n in block.loaded if n in ns and n != OPS_NAME and not _is_builtin(n, ns))


def _is_builtin(name: str, ns: dict) -> bool:
    return hasattr(builtins, name) and ns.get(name) is getattr(builtins, name)


def block_of(program: Program, filename: str | None = None) -> Block:
    """A Block for a received Program: its text registered under `filename` so nested blocks resolve.

    Blocks (and so their compiled code) are reused for a program seen before, as a local trace reuses
    the Block of its `with` statement.
    """
    filename = filename or program.filename
    text = "\n" * (program.first_line - 1) + program.source
    register_source(filename, text)
    scope = program.enclosing_function if program.enclosing_function.isidentifier() else "<module>"
    return _block_of_text(filename, text, program.first_line, program.source, scope)


@bytes_lru_cache()
def _block_of_text(filename: str, text: str, first_line: int, source: str, scope: str) -> Block:
    module = parse(text, filename)
    if not module.body:
        module.body = [ast.Pass(lineno=first_line, col_offset=0)]
    node = ast.With(items=[ast.withitem(context_expr=ast.Constant(None))], body=module.body,
                    lineno=max(first_line - 1, 1), col_offset=0)
    block = Block.of(filename, node, source, first_line=first_line)
    block.scope = scope
    return block


def execute(model: Any, program: Program, bindings: dict, *, filename: str | None = None,
            local: Callable[[Block, dict], dict] | None = None, log: Callable[..., None] = print,
            cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run `program` on `model` (an NNsight) and return what the caller gets back, by name.

    Saved values come back as they are; unsaved activations and unreached names as the stand-ins of
    `saving` (callers on a wire send their kind, not the object). `print` in the body goes to `log`.
    """
    block = block_of(program, filename)
    context = context_of(model, program, log)
    context._block = block
    ns = {**bindings, OPS_NAME: ops, "print": log}
    if program.tracer_name:
        ns[program.tracer_name] = context
    scope = SaveScope(tensor_save=program.kind == "session")
    with scope, local_handler(local or run_local_block), cancel_scope(cancel):
        context._run(ns)
    return hand_back(ns, block.assigned, scope, bindings, why=context._why_unreached())


def context_of(model: Any, program: Program, log: Callable[..., None]) -> Any:
    """The Tracer (or Session) `program` runs in on `model`, not yet run; `print` in its body goes to `log`."""
    if program.kind == "session":
        context = model.session()
    elif program.kind in ("trace", "generate", "scan"):
        entry = {"trace": model.trace, "generate": getattr(model, "generate", None), "scan": model.scan}[program.kind]
        if entry is None:
            raise ValueError(f"This model has no `{program.kind}` entry point.")
        context = entry(*program.args, **program.kwargs)
    else:
        raise ValueError(f"Unknown program kind {program.kind!r}; expected one of {KINDS}.")
    context.log = log
    return context


def local_block_at(filename: str, text: str, first_line: int) -> Block:
    """The `local()` block whose body starts at `first_line` in `text` (the user's source)."""
    return find_in_text(filename, text, first_line - 1)


def run_local_block(block: Block, ns: dict) -> dict[str, Any]:
    """Run a `local()` block's body in `ns`; returns the names it assigned (to send back)."""
    exec(block.code(), ns)
    return {name: ns[name] for name in block.assigned if name in ns}
