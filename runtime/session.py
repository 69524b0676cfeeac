"""Session and Edit blocks: several traces run in order, and interventions that persist on a model.

A session body runs as plain Python; the traces inside it share its names, so values flow from one
trace to the next without `.save()`. An edit body is kept and run as an extra invoke in later traces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .contexts import Cond, Context, ExitLoop, Iterator, LocalBlock, RemoteRequest

__all__ = ["Session", "Edit"]


class _ExitSession(BaseException):
    """Raised by `session.exit()`; ends the session body quietly."""


class Session(Context):
    """`with model.session():` — traces inside run one after another and share their values."""

    _tensor_save = True

    def __init__(self, model: Any, *, remote: bool = False, remote_options: dict | None = None,
                 log: Callable[..., None] = print):
        self._model = model
        self._remote = remote
        self._remote_options = remote_options or {}
        self.log = log

    def remote_request(self) -> RemoteRequest:
        """What this session asks of a remote run (the client's encoder reads this)."""
        return RemoteRequest(self._model, "session", self._remote_options)

    def _execute(self, ns: dict) -> None:
        if self._remote:
            from .remote import run_remote

            run_remote(self, ns)
            return
        try:
            exec(self._block.code(), ns)
        except (_ExitSession, ExitLoop):
            pass

    def iter(self, items: Iterable, return_context: bool = False) -> Iterator:
        """`with session.iter(seq) as item:` — run the block once per item."""
        return Iterator(items, return_context=return_context, log=self.log)

    def cond(self, condition: Any) -> Cond:
        return Cond(condition)

    def exit(self) -> None:
        """End the session here; what ran so far is kept."""
        raise _ExitSession()

    stop = exit

    def local(self) -> LocalBlock:
        return LocalBlock()


class Edit(Context):
    """`with model.edit() as edited:` — the body runs in every later trace of `edited`."""

    _hands_back = False

    def __init__(self, model: Any, *, inplace: bool = False):
        self._target = model if inplace else model._edited_copy()

    def _enter_value(self) -> Any:
        return self._target

    def _execute(self, ns: dict) -> None:
        self._target._edits.append((self._block, ns))
