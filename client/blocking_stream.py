"""A blocking caller's streaming call on gRPC's blocking channel, and what every stream hands its reader.

A stream of the asyncio loop thread (channel.Stream) costs a blocking caller two hand-offs per message it
answers: the loop thread reads it, and writing the answer goes back through the loop. `BlockingStream` reads
on a thread of its own and writes through gRPC's own request thread: one `local()` round trip costs no event
loop. The caller still waits on a queue, never inside gRPC, and in slices (`next_item`), so Ctrl-C reaches it
at once (and the driver then cancels the job). Imports grpc and the standard library only; never the server, the runtime or asyncio.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

__all__ = ["END", "SIGNAL_CHECK_S", "BlockingStream", "Cancelled", "Sending", "Written", "failure", "hand_over",
           "item_of", "next_item"]

END = object()  # what a stream's reader gets once the call ended
SIGNAL_CHECK_S = 0.1  # s: the longest a caller's wait goes without running Python's signal handlers (Ctrl-C)


class Cancelled(grpc.RpcError):
    """A call cancelled on the client's side (it reads like the status it stands for)."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return self._details


def hand_over(inbox: queue.SimpleQueue, on_response: Callable[[Any], Any] | None, response: Any) -> None:
    """One response to a stream's reader: as it is, or what `on_response` makes of it (None: nothing)."""
    item = response if on_response is None else on_response(response)
    if item is not None:
        inbox.put(item)


def failure(error: grpc.RpcError, cancelled: str) -> grpc.RpcError:
    """What a stream's reader gets when its call failed: the error, or Cancelled with the client's reason."""
    return Cancelled(cancelled) if cancelled else error


class Written:
    """How many messages a stream was given and has not written yet (handed to gRPC's transport): what a caller
    that cancels right after a last message waits for, so the cancel cannot overtake it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._unwritten = 0

    def queued(self) -> None:
        with self._cond:
            self._unwritten += 1

    def written(self) -> None:
        """One message was written, or dropped (the call had ended)."""
        with self._cond:
            self._unwritten = max(0, self._unwritten - 1)
            if not self._unwritten:
                self._cond.notify_all()

    def ended(self) -> None:
        """The call ended: nothing left will be written."""
        with self._cond:
            self._unwritten = 0
            self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._unwritten, timeout)


class Sending:
    """What both kinds of stream do with a message they are given to write: drop it once nothing more goes out,
    note the end of the client's side, count it until written (`flush`). Subclasses set `_closed`, `finished`
    and `_written`."""

    _closed: bool
    finished: bool
    _written: Written

    def _accept(self, message: Any) -> bool:
        """Whether `message` (None: the end of the client's side) is to be written."""
        if self._closed or self.finished:
            return False  # nothing more goes out (the server ended the call, or the client's side is closed)
        if message is None:
            self._closed = True
        else:
            self._written.queued()
        return True

    def flush(self, timeout: float) -> bool:
        """Wait at most `timeout` until every message sent so far is written; whether it was."""
        return self._written.wait(timeout)


def item_of(item: Any) -> Any:
    """A queued item as the reader gets it: an error raises."""
    if isinstance(item, BaseException):
        raise item
    return item


def next_item(inbox: queue.SimpleQueue) -> Any:
    """The next item of a stream's inbox as its reader gets it, waited for in slices: a wait with no end wakes
    for a signal only when the OS hands it to the waiting thread, and a Ctrl-C handed to another of the
    process's threads (gRPC's, the reader's) would otherwise reach the caller only once an item came."""
    while True:
        try:
            return item_of(inbox.get(timeout=SIGNAL_CHECK_S))
        except queue.Empty:
            pass


class BlockingStream(Sending):
    """One streaming call on a blocking channel, read (and for RunJob written) from the caller's thread; the
    same interface as channel.Stream without its asyncio side (`next_async`)."""

    END = END

    def __init__(self, method: Any, request: Any, metadata: tuple, timeout: float | None,
                 on_response: Callable[[Any], Any] | None = None, first: Any = None):
        self._on_response = on_response  # runs on the reader thread: what to hand the caller (None: nothing)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # responses, then END or the RpcError
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # messages to write; None ends the client's side
        self._cancelled = ""  # why cancel() was called
        self._closed = False  # the client's side was ended (send(None)); later sends are dropped
        self.finished = False  # the call ended (every response is in the inbox)
        self._written = Written()
        if request is None:  # bidirectional: `first`, then what send() queues, written by gRPC's request thread
            self._call = method(self._requests(first), metadata=metadata, timeout=timeout, wait_for_ready=True)
        else:
            self._call = method(request, metadata=metadata, timeout=timeout, wait_for_ready=True)
        threading.Thread(target=self._read, name="tether-stream", daemon=True).start()

    def _requests(self, first: Any) -> Iterator[Any]:
        if first is not None:
            yield first
        while (message := self._outbox.get()) is not None:
            yield message
            self._written.written()  # (gRPC asks for the next message once it has written this one)

    def _read(self) -> None:
        inbox, on_response = self._inbox, self._on_response
        try:
            for response in self._call:
                hand_over(inbox, on_response, response)
            self.finished = True
            inbox.put(END)
        except grpc.RpcError as error:
            self.finished = True
            inbox.put(failure(error, self._cancelled))
        except BaseException as error:  # on_response failed: stop the call, never leave the reader waiting
            self.finished = True
            self._call.cancel()
            inbox.put(error)
        finally:
            self._outbox.put(None)  # (gRPC's request thread ends with the call, never waiting for more)
            self._written.ended()

    def send(self, message: Any) -> None:
        """Write one message on a bidirectional stream; `None` ends the client's side."""
        if self._accept(message):
            self._outbox.put(message)

    def cancel(self, reason: str = "cancelled by the client") -> None:
        self._cancelled = self._cancelled or reason
        self._call.cancel()

    def next(self) -> Any:
        """The next item (blocking the caller's thread), or END; the call's failure raises."""
        return next_item(self._inbox)

    def __iter__(self) -> Iterator[Any]:
        while (item := self.next()) is not END:
            yield item
