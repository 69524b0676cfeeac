"""The worker protocol: the one seam between the front door and a worker (one model replica, in its own process).

Front door -> worker: `RunJob`, `RunBatch`, `LocalAnswer`, `Cancel`, `Reclaim`, `Stop`. Worker -> front door:
`Ready`, `Running`, `Log`, `LocalCall`, `Done`, `Failed`. Messages are small picklable dataclasses sent over any
`Connection`-like pair (send/recv/poll: a multiprocessing Pipe here; an actor's queue under Ray). A worker process
also has a direct pipe (`DirectPipe`) that its job thread reads itself, without its inbox thread: RunJob, RunBatch
and Stop while it is idle, LocalAnswers while its job waits for one (sent by whichever front-door thread has the
answer first); without one (Ray) they go with the rest. Bulky bytes
(programs with inputs, results, local() values) travel as `Blob`s, in shared memory above SHM_THRESHOLD so
they cross without going through the pipe; a worker process's large results go in its reusable result areas
(`Area`, result_areas.py). Imports the standard library only.
"""

from __future__ import annotations

import itertools
import mmap
import os
import pickle
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection

__all__ = [
    "Blob", "Area", "pack", "unpack", "SHM_THRESHOLD",
    "RunJob", "RunBatch", "LocalAnswer", "Cancel", "Stop", "Reclaim",
    "Ready", "Running", "Log", "LocalCall", "Done", "Failed", "discard", "DirectPipe", "plain_pickle",
]

SHM_THRESHOLD = 1 << 20  # bytes: below this, bytes go through the pipe (one copy); above, through shared memory
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None  # where Blobs and result areas live
_names = itertools.count()


@dataclass(frozen=True)
class Blob:
    """Bytes in shared memory: a file in /dev/shm the receiver maps and unlinks (so it is freed with the map)."""

    path: str
    size: int


@dataclass(frozen=True)
class Area:
    """A result at the start of one of the worker's reusable result areas (result_areas.py): a /dev/shm file of
    `capacity` bytes, its first `size` bytes the result; the front door reads it until it sends a Reclaim."""

    path: str
    capacity: int
    size: int


def shm_file(size: int, kind: str = "") -> tuple[str, int]:
    """A new /dev/shm file of `size` bytes, as (path, open descriptor). Its memory is allocated now (fallocate): a
    full /dev/shm fails here with OSError, leaving nothing behind, never later with a SIGBUS while it is written
    (as a file only sized by ftruncate would)."""
    path = os.path.join(SHM_DIR, f"tether-{os.getpid()}-{kind}{next(_names)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return path, fd


def pack(pieces: list) -> bytes | Blob:
    """Bytes-like pieces as one thing to send: bytes when small, a Blob (one copy into shared memory) when large.
    With /dev/shm full (see shm_file), the pieces go as bytes, through the pipe."""
    size = sum(len(p) for p in pieces)
    if size < SHM_THRESHOLD or SHM_DIR is None:
        return b"".join(pieces)
    try:
        path, fd = shm_file(size)
    except OSError:
        return b"".join(pieces)
    try:
        with mmap.mmap(fd, size) as out:
            offset = 0
            for piece in pieces:
                n = len(piece)
                out[offset:offset + n] = piece
                offset += n
    finally:
        os.close(fd)
    return Blob(path, size)


def unpack(data: bytes | Blob) -> bytes | memoryview:
    """What `pack` sent: the bytes, or a read-only view of the shared memory (mapped, then unlinked: it lives as
    long as the view)."""
    if not isinstance(data, Blob):
        return data
    if data.size == 0:
        os.unlink(data.path)
        return b""
    fd = os.open(data.path, os.O_RDONLY)
    try:
        mapped = mmap.mmap(fd, data.size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
        os.unlink(data.path)
    return memoryview(mapped)


def discard(data: bytes | Blob | None) -> None:
    """Free a Blob that will never be unpacked (its job ended first)."""
    if isinstance(data, Blob):
        try:
            os.unlink(data.path)
        except FileNotFoundError:
            pass


# ---- front door -> worker ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunJob:
    """Run one job: its serialized Program (checked by the front door already) and its limits."""

    job_id: str
    program: bytes | Blob
    timeout: float  # seconds from Running to the deadline
    max_result_bytes: int
    has_stream: bool  # whether local() calls can be answered (a RunJob stream)


@dataclass(frozen=True)
class RunBatch:
    """Run compatible jobs (equal batch keys) as one batched run; each reports on its own, by its job id."""

    jobs: tuple[RunJob, ...]


@dataclass(frozen=True)
class LocalAnswer:
    """The answer to a LocalCall: the serialized ValueMap of the block's writes, or an error to raise there.

    error: the name of a server error class (LocalBlockFailed, LocalCallFailed, JobTimeout, JobCancelledError),
    with its message and (LocalBlockFailed) the client's serialized Failure."""

    call_id: str
    data: bytes | Blob = b""
    error: str = ""
    message: str = ""
    failure: bytes = b""


class _PlainPickle:
    """A Pipe's Connection whose `send` writes plain pickle (what `Connection.recv` reads): `Connection.send`'s
    ForkingPickler costs ~4x more for these small dataclasses (~25 us a message against ~7), and its reducers
    (file descriptors, shared tensors) are for what no message holds. Everything else is the Connection's."""

    def __init__(self, conn: Connection):
        self._conn = conn

    def send(self, message) -> None:
        self._conn.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def plain_pickle(conn):
    """`conn` sending plain pickle when it is a Pipe's Connection (see _PlainPickle); anything else (a Ray actor's
    queue) as it is."""
    return _PlainPickle(conn) if isinstance(conn, Connection) else conn


class DirectPipe:
    """The front door's end of a worker's direct pipe (read by the worker's job thread). The relay thread (jobs and
    their Reclaims, Stop, answers) and a RunJob stream's reader (the client's answer, without a hand-off to the
    relay) both write to it, one message at a time."""

    def __init__(self, conn):
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: RunJob | RunBatch | Reclaim | LocalAnswer | Stop) -> None:
        """Send a message; a worker that is gone is noticed by the relay (its pipe's end, its process)."""
        with self._lock:
            try:
                self._conn.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))  # (see _PlainPickle)
            except (OSError, ValueError):
                if isinstance(message, LocalAnswer):
                    discard(message.data)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@dataclass(frozen=True)
class Cancel:
    """Stop the running job at its next module boundary (the worker's watchdog interrupts it after a grace)."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class Reclaim:
    """Result areas the front door no longer reads (sent before a job): write them again, or close them."""

    reuse: tuple[str, ...]
    drop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stop:
    """End the worker once its current job is done."""


# ---- worker -> front door ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """The worker has its replica and takes jobs."""

    pid: int


@dataclass(frozen=True)
class Running:
    """The job's program started (`batch_size`: jobs sharing its batched run, itself included)."""

    job_id: str
    batch_size: int = 1


@dataclass(frozen=True)
class Log:
    """One line the job printed."""

    job_id: str
    text: str


@dataclass(frozen=True)
class Progress:
    """A generation job started forward pass `step` of `total` (0: unknown), for the client's "step k/N"."""

    job_id: str
    step: int
    total: int


@dataclass(frozen=True)
class LocalCall:
    """A local() block to run on the client: the serialized ValueMap of the names it reads. One-way: the job
    went on without waiting (its code reads nothing the block binds); the worker reads the answer (or the error
    in its place) before its next call and before it ends."""

    job_id: str
    call_id: str
    block_id: str
    payload: bytes | Blob
    one_way: bool = False


@dataclass(frozen=True)
class Done:
    """The job's serialized JobResult."""

    job_id: str
    result: bytes | Blob | Area
    retire: str = ""  # why the replica must run no more jobs (weights a job wrote into could not be put back)


@dataclass(frozen=True)
class Failed:
    """The job ended with an error: its serialized Failure, the gRPC status code's name, and whether it was
    cancelled (then the front door reports CANCELLED with the cancel's reason)."""

    job_id: str
    failure: bytes
    code: str
    cancelled: bool
    retire: str = ""  # as in Done
