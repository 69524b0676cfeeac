"""The connection between a replica's supervisor (in the cluster's core) and its Ray actor, with a Pipe's
send/recv/poll/fileno so the supervisor's relay (job_relay.py) runs unchanged, and the actor's end of it that
the worker loop (`worker_main.serve`) uses.

Two ways, one chosen when the actor starts: lanes (lanes.py: sockets, each message one write; bulky bytes
inline; a second lane, the direct one, read by the actor's job thread itself) when the supervisor can open them
to the actor, else Ray actor calls (`put`, and `take` polls of the
actor's outbox; bulky bytes as objects in Ray's object store). Either way a dead actor reads as EOF, with
Ray's account of its death. Imports ray lazily, the protocol and lanes.py; never the job store.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pickle
import queue
import threading
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from . import worker_protocol as wp
from .lanes import hang_up

__all__ = ["ActorConnection", "LaneConnection", "ActorSide", "LaneSide", "Answers", "DirectLane", "TAKE_WAIT", "PULLS",
           "why_dead"]

TAKE_WAIT = 0.5  # seconds one poll of an actor's outbox waits for a message (a dead actor is seen within this)
PULLS = 2  # polls of an actor's outbox in flight at once: a message never waits for the next poll to arrive
DEATH_WAIT = 5.0  # s: a lane that closed waits this long for Ray's account of the actor's death


@dataclasses.dataclass(frozen=True)
class _Stored:
    """Bytes in Ray's object store, standing for a Blob while a message crosses to another process or node."""

    ref: Any
    size: int


def _outgoing(value: Any) -> Any:
    """`value` (a message) with each Blob, or large bytes, moved into the object store; also inside lists,
    tuples and nested messages (a batch's programs)."""
    import ray

    if isinstance(value, wp.Blob) or (isinstance(value, bytes) and len(value) >= wp.SHM_THRESHOLD):
        data = bytes(wp.unpack(value))
        return _Stored(ray.put(data), len(data))
    return _mapped(value, _outgoing)


def _incoming(value: Any) -> Any:
    """`value` with its stored bytes back as bytes."""
    import ray

    if isinstance(value, _Stored):
        return ray.get(value.ref)
    return _mapped(value, _incoming)


def _inline(value: Any) -> Any:
    """`value` with each Blob (a file in this node's shared memory) as its bytes, to cross a lane."""
    if isinstance(value, wp.Blob):
        return bytes(wp.unpack(value))
    return _mapped(value, _inline)


def _pickled(message: Any) -> bytes:
    """A message as it crosses a lane: its Blobs inline, in plain pickle (what `Connection.recv` reads; the
    ForkingPickler of `Connection.send` costs more and its reducers are for what no message holds)."""
    return pickle.dumps(_inline(message), pickle.HIGHEST_PROTOCOL)


_FIELDS: dict[type, tuple[str, ...]] = {}  # a message class's field names (() for a type that is no dataclass)


def _mapped(value: Any, convert) -> Any:
    """`value` with `convert` applied to its items (a list or tuple) or fields (a dataclass); the field names are
    looked up once per class (every message crosses here: this is on each local() call's path)."""
    kind = type(value)
    if kind in (list, tuple):
        return kind(convert(v) for v in value)
    names = _FIELDS.get(kind)
    if names is None:
        dataclass = dataclasses.is_dataclass(value) and not isinstance(value, type)
        names = _FIELDS[kind] = tuple(field.name for field in dataclasses.fields(value)) if dataclass else ()
    changes = {}
    for name in names:
        old = getattr(value, name)
        new = convert(old)
        if new is not old:
            changes[name] = new
    return dataclasses.replace(value, **changes) if changes else value


# ---- the actor's end ---------------------------------------------------------------------------------------


class ActorSide:
    """The worker's end inside the actor, over Ray calls: what `serve` sends goes to the actor's outbox (read
    by the supervisor's `take` polls); what the supervisor `put` arrives in order through `recv`."""

    def __init__(self):
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()  # (sequence, message): PULLS takes read it at once
        self._sent = itertools.count()  # guarded by _send_lock, with the outbox's order
        self._send_lock = threading.Lock()
        self._inbox: dict[int, Any] = {}
        self._next = 0
        self._cond = threading.Condition()

    def send(self, message: Any) -> None:
        self.post(_outgoing(message))

    def post(self, message: Any) -> None:
        """Queue a message (None: the worker loop ended) with its sequence, so the supervisor reorders them."""
        with self._send_lock:
            self.outbox.put((next(self._sent), message))

    def close(self) -> None:
        self.post(None)

    def deliver(self, seq: int, message: Any) -> None:
        with self._cond:
            self._inbox[seq] = message
            self._cond.notify_all()

    def recv(self) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._next in self._inbox)
            message = self._inbox.pop(self._next)
            self._next += 1
        if message is None:
            raise EOFError("the supervisor closed the connection")
        return _incoming(message)

    def take(self, timeout: float) -> list:
        """The worker's messages as (sequence, message): waits up to `timeout` for the first, then takes all that
        are ready (a message None: the worker loop has ended). PULLS takes wait at once, so one may return while
        the next is already waiting: the supervisor orders their messages by sequence."""
        try:
            messages = [self.outbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                messages.append(self.outbox.get_nowait())
            except queue.Empty:
                return messages


class LaneSide:
    """The worker's end inside the actor, over a lane: each message one write (several threads send)."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._send_lock = threading.Lock()

    def send(self, message: Any) -> None:
        data = _pickled(message)
        with self._send_lock:
            self._conn.send_bytes(data)

    def recv(self) -> Any:
        return self._conn.recv()

    def close(self) -> None:
        """The worker loop ended: the supervisor's end reads EOF (the inbox's thread may still be reading)."""
        hang_up(self._conn)


# ---- the supervisor's end ----------------------------------------------------------------------------------


class Answers:
    """A replica's direct path over Ray calls (`Replica.direct`, as worker_protocol.DirectPipe): a local() answer
    goes from the thread that has it (the one serving a door's `deliver`) straight onto the connection to the
    actor, without a hand-off to the relay thread; the actor's inbox passes it to the job that waits. Jobs,
    Reclaims and Stop sent this way go on the same connection, in order."""

    def __init__(self, conn: Any):
        self._conn = conn

    def send(self, message: wp.RunJob | wp.RunBatch | wp.Reclaim | wp.LocalAnswer | wp.Stop) -> None:
        """Send a message; an actor that is gone is noticed by the relay (its connection's end)."""
        try:
            self._conn.send(message)
        except (OSError, EOFError, ValueError):
            if isinstance(message, wp.LocalAnswer):
                wp.discard(message.data)

    def close(self) -> None:
        """(The connection is the supervisor's to close.)"""


class DirectLane:
    """A replica's direct path over a lane of its own (`Replica.direct`, as worker_protocol.DirectPipe): jobs,
    their Reclaims, Stop and local() answers, read by the actor's job thread itself (`worker_main.serve`'s
    `direct`), so an answer reaches the job that waits without a hand-off to the actor's inbox thread. Several
    threads send (the relay, and the one serving a door's `deliver`), one message at a time."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: wp.RunJob | wp.RunBatch | wp.Reclaim | wp.LocalAnswer | wp.Stop) -> None:
        """Send a message; an actor that is gone is noticed by the relay (the main lane's end)."""
        data = _pickled(message)
        with self._lock:
            try:
                self.conn.send_bytes(data)
            except (OSError, ValueError):
                if isinstance(message, wp.LocalAnswer):
                    wp.discard(message.data)

    def close(self) -> None:
        """Shut the lane down (the actor's job thread reads EOF); its descriptor is closed with the Connection
        object, as the main lane's (the watcher may still shut it down: a closed number could be reused)."""
        hang_up(self.conn)


class _Link:
    """What both ends share: why the actor ended (`death`, from Ray), a file descriptor readable once it has
    (`sentinel`), and pipes closed only once the thread that watches the actor has stopped writing to them."""

    def __init__(self, actor: Any):
        self._actor = actor
        self._cond = threading.Condition()
        self._dead_read, self._dead_write = os.pipe()
        self.death = ""  # guarded by _cond: why the actor (or its worker loop) ended; "" while it runs
        self._closed = False  # guarded by _cond: close() was called (the supervisor is done with it)
        self._watching = True  # guarded by _cond: the watching thread may still write to the pipes

    def _end(self, why: str) -> None:
        with self._cond:
            if not self.death:
                self.death = why
            self._cond.notify_all()
        os.write(self._dead_write, b"e")

    def _watched(self) -> None:
        """The watching thread stops: the pipes are released if the supervisor is done with them."""
        with self._cond:
            self._watching = False
            release = self._closed
        if release:
            self._close_pipes()

    def wait_death(self, timeout: float | None) -> str:
        with self._cond:
            self._cond.wait_for(lambda: self.death, timeout)
            return self.death

    @property
    def sentinel(self) -> int:
        """A file descriptor readable once the actor has died."""
        return self._dead_read

    def close(self) -> None:
        """The supervisor is done with this connection: its pipes are closed once the watcher has stopped. Once:
        the replica closes it as it kills the actor and again when joined or restarted (a second close of the
        pipes' numbers would close the files other threads have opened since under them)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            release = not self._watching
        self._closed_by_supervisor()
        if release:
            self._close_pipes()

    def _closed_by_supervisor(self) -> None:
        """(What a subclass releases at once on close.)"""

    def _close_pipes(self) -> None:
        for fd in self._pipes():
            try:
                os.close(fd)
            except OSError:
                pass

    def _pipes(self) -> tuple[int, ...]:
        return self._dead_read, self._dead_write


class LaneConnection(_Link):
    """The supervisor's end over a lane. A watcher thread holds one call on the actor (`ended`, answered when its
    worker loop ends) that Ray fails when the actor dies: its error is the death's account; the lane is then
    shut down, so a read sees EOF even where the peer's node vanished without closing it."""

    def __init__(self, actor: Any, conn: Connection, name: str, direct: Connection | None = None):
        super().__init__(actor)
        self._conn = conn
        self._direct = direct  # the direct lane's connection (DirectLane's), shut down with this one
        self._send_lock = threading.Lock()
        threading.Thread(target=self._watch, name=f"tether-ray-watch-{name}", daemon=True).start()

    def _watch(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        try:
            ray.get(self._actor.ended.remote())
            why = "its worker loop ended"
        except RayActorError as error:
            why = why_dead(error)
        except Exception as error:  # the cluster went away
            why = f"its Ray actor could not be reached ({type(error).__name__}: {_first_line(error)})"
        try:
            self._end(why)
            self._hang_up()
        finally:
            self._watched()

    def _hang_up(self) -> None:
        hang_up(self._conn)
        if self._direct is not None:
            hang_up(self._direct)

    def fileno(self) -> int:
        return self._conn.fileno()

    def send(self, message: Any) -> None:
        if self.death or self._closed:
            raise BrokenPipeError(self.death or "the connection is closed")
        data = _pickled(message)
        with self._send_lock:
            self._conn.send_bytes(data)

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self._conn.poll(timeout)

    def recv(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError):  # the actor died (or its lane broke): say what Ray says of it
            raise EOFError(self.wait_death(DEATH_WAIT) or "its lane closed") from None

    def _closed_by_supervisor(self) -> None:
        """Shut the lane down; its descriptor is closed with the Connection object (a relay thread may still be
        reading it: a number closed under a reader could be reused by another file)."""
        self._hang_up()


class ActorConnection(_Link):
    """The supervisor's end over Ray calls (where no lane could be opened). A pump thread polls the actor's
    outbox (PULLS `take` calls in flight) and puts the messages back in order; a dead actor reads as EOF."""

    def __init__(self, actor: Any, name: str):
        super().__init__(actor)
        self._seq = itertools.count()
        self._send_lock = threading.Lock()
        self._messages: deque = deque()
        self._read_fd, self._write_fd = os.pipe()
        threading.Thread(target=self._pump, name=f"tether-ray-pump-{name}", daemon=True).start()

    def _pipes(self) -> tuple[int, ...]:
        return self._read_fd, self._write_fd, self._dead_read, self._dead_write

    def _pump(self) -> None:
        try:
            self._pump_messages()
        finally:
            self._watched()

    def _pump_messages(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        polls = [self._actor.take.remote(TAKE_WAIT) for _ in range(PULLS)]
        held: dict[int, Any] = {}  # messages by sequence, until those before them arrived
        expected = 0
        while not self._closed:
            try:
                ready, _ = ray.wait(polls, num_returns=1)
                polls.remove(ready[0])
                polls.append(self._actor.take.remote(TAKE_WAIT))  # (before reading: the actor is never unpolled)
                held.update(ray.get(ready[0]))
            except RayActorError as error:
                self._end(why_dead(error))
                return
            except Exception as error:  # the cluster went away
                self._end(f"its Ray actor could not be reached ({type(error).__name__}: {_first_line(error)})")
                return
            while expected in held:
                message = held.pop(expected)
                expected += 1
                if message is None:
                    self._end("its worker loop ended")
                    return
                with self._cond:
                    self._messages.append(message)
                    self._cond.notify_all()
                os.write(self._write_fd, b"m")

    def _end(self, why: str) -> None:
        os.write(self._write_fd, b"e")
        super()._end(why)

    def fileno(self) -> int:
        return self._read_fd

    def send(self, message: Any) -> None:
        if self.death or self._closed:
            raise BrokenPipeError(self.death or "the connection is closed")
        with self._send_lock:
            self._actor.put.remote(next(self._seq), _outgoing(message))

    def poll(self, timeout: float | None = 0.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._messages or self.death, timeout)

    def recv(self) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._messages or self.death)
            if not self._messages:
                raise EOFError(self.death)
            message = self._messages.popleft()
        os.read(self._read_fd, 1)
        try:
            return _incoming(message)
        except Exception as error:  # its bytes were lost with the actor (their owner) before we read them
            raise EOFError(f"its Ray actor's message was lost ({type(error).__name__}: {_first_line(error)})") \
                from error


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def why_dead(error: BaseException) -> str:
    """A dead actor's story, from Ray's error (its first line names the cause: killed, exited, node died...)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = next((line for line in lines if "reason" in line.lower() or "died" in line.lower()), lines[0] if lines
                 else type(error).__name__)
    return f"its Ray actor died: {cause[:300]}"
