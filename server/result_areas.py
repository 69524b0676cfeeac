"""A worker process's large results through reusable shared memory (result areas), on both sides of the pipe:
/dev/shm files the worker keeps mapped and the front door maps once, so pages fault once per area, not per
result. Imports the standard library, grpc (status codes), the worker protocol, errors and result_bytes only.
"""

from __future__ import annotations

import collections
import glob
import mmap
import os
import threading
import weakref

import grpc

from . import worker_protocol as wp
from .errors import ServerError
from .result_bytes import ResultBytes

__all__ = ["WorkerAreas", "DoorAreas", "KEEP_IDLE", "GRANULE"]

KEEP_IDLE = 2  # free areas a worker keeps for the next results; the front door has it close any more
GRANULE = 2 << 20  # bytes: an area's size is its first result's, rounded up to this (later results fit more often)
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map every page at once (one call, not a fault per page)


def _leftovers(pid: int) -> list[str]:
    """The shared-memory files a worker process (`pid`) made and nobody else holds yet (tether-PID-...)."""
    return glob.glob(os.path.join(wp.SHM_DIR, f"tether-{pid}-*")) if wp.SHM_DIR else []


class WorkerAreas:
    """The worker's result areas: each large result is copied into a free one (or a new one) and sent as a
    `wp.Area`; the area stays the front door's until a `wp.Reclaim` hands it back (on the pipe of its jobs, before the next
    job, so the worker never writes into an area the front door still reads). Small results go as bytes.

    Areas stay mapped here, already faulted: a later job's program could reach them only through raw memory
    access, which the policy does not allow (as with the freed memory torch hands out again)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._mapped: dict[str, mmap.mmap] = {}  # guarded by _lock: path -> the area's mapping, every area we hold
        self._free: list[str] = []  # guarded by _lock: areas handed back, to be written again

    def pack(self, pieces: list) -> bytes | wp.Area:
        """Result pieces as one thing to send: bytes when small, else copied into a free or new area."""
        size = sum(len(p) for p in pieces)
        if size < wp.SHM_THRESHOLD or wp.SHM_DIR is None:
            return b"".join(pieces)
        try:
            path = self._take(size) or self._create(size)
        except OSError as error:
            raise ServerError(
                f"the server has no room in its shared memory (/dev/shm) for this job's result of {size} bytes "
                f"({error.strerror}). Save less, or retry once other jobs' results have expired.",
                code=grpc.StatusCode.RESOURCE_EXHAUSTED) from None
        mapped = self._mapped[path]
        offset = 0
        for piece in pieces:
            n = len(piece)
            mapped[offset:offset + n] = piece
            offset += n
        return wp.Area(path, len(mapped), size)

    def _take(self, size: int) -> str | None:
        """The smallest free area that holds `size` bytes (taken off the free list), or None."""
        with self._lock:
            fits = [path for path in self._free if len(self._mapped[path]) >= size]
            if not fits:
                return None
            path = min(fits, key=lambda p: len(self._mapped[p]))
            self._free.remove(path)
            return path

    def _create(self, size: int) -> str:
        """A new area for `size` bytes. Its memory is allocated at once (fallocate): a full /dev/shm fails here
        with an error, not later with a SIGBUS while the result is written."""
        capacity = -(-size // GRANULE) * GRANULE
        path, fd = wp.shm_file(capacity, "area-")
        try:
            mapped = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        with self._lock:
            self._mapped[path] = mapped
        return path

    def reclaim(self, message: wp.Reclaim) -> None:
        """Areas the front door no longer reads: written again (`reuse`) or closed (`drop`)."""
        with self._lock:
            self._free += [path for path in message.reuse if path in self._mapped]
            for path in message.drop:
                if path in self._free:
                    self._free.remove(path)
                mapped = self._mapped.pop(path, None)
                if mapped is not None:
                    mapped.close()



class DoorAreas:
    """The front door's side of one worker process's areas: maps each area the first time a result names it
    (and unlinks its file: it then lives while mapped), serves results as views of the mapping, and notes the
    areas whose results are gone (the job record and every reader dropped them) for the next `reclaim`."""

    def __init__(self, pid: int | None = None):
        self.pid = pid  # the worker process (None: a worker without a process of its own)
        self._lock = threading.Lock()
        self._mapped: dict[str, mmap.mmap] = {}  # guarded by _lock: path -> our read-only map of the area
        self._free: set[str] = set()  # guarded by _lock: areas handed back to the worker and not written since
        # areas no result holds, not yet handed back: appended without the lock (see _release), taken under it
        self._released: collections.deque[str] = collections.deque()

    def result(self, data: bytes | wp.Blob | wp.Area) -> ResultBytes:
        """A Done's result as ResultBytes: a view of the area (handed back once the ResultBytes is gone)."""
        if not isinstance(data, wp.Area):
            return ResultBytes([wp.unpack(data)])
        mapped = self._map(data)
        result = ResultBytes([memoryview(mapped)[: data.size]])
        weakref.finalize(result, self._release, data.path)
        return result

    def discard(self, data: bytes | wp.Blob | wp.Area | None) -> None:
        """A Done's result that no job will hold (its job ended first): freed, or its area handed back."""
        if isinstance(data, wp.Area):
            self._map(data)
            self._release(data.path)
        else:
            wp.discard(data)

    def _map(self, area: wp.Area) -> mmap.mmap:
        with self._lock:
            self._free.discard(area.path)
            mapped = self._mapped.get(area.path)
            if mapped is not None:
                return mapped
            fd = os.open(area.path, os.O_RDONLY)
            try:
                mapped = mmap.mmap(fd, area.capacity, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
                os.unlink(area.path)
            self._mapped[area.path] = mapped
            return mapped

    def _release(self, path: str) -> None:
        """(Any thread: whichever dropped the result last, or the cyclic collector's, which runs wherever an
        object is allocated: inside `reclaim` or `_map` too, with the lock held. So no lock here: the deque's
        append is atomic.)"""
        self._released.append(path)

    def reclaim(self) -> wp.Reclaim | None:
        """The areas to hand back before the next job, or None when there are none: the worker keeps the
        KEEP_IDLE largest free ones (those it had and these), so a large result finds one; it closes the rest,
        and so do we. (Between jobs the worker writes no area: closing one it had free is safe.)"""
        with self._lock:
            released = []
            while self._released:  # (one that a collection inside this adds goes now or at the next reclaim)
                released.append(self._released.popleft())
            if not released:
                return None
            free = [*self._free, *released]
            keep = set(sorted(free, key=lambda path: len(self._mapped[path]), reverse=True)[:KEEP_IDLE])
            reuse = [path for path in released if path in keep]
            drop = [path for path in free if path not in keep]
            self._free = keep
            for path in drop:
                del self._mapped[path]  # unmapped once no view of it is left
            return wp.Reclaim(tuple(reuse), tuple(drop))

    def close(self) -> None:
        """The worker ended: its files nobody mapped (a result it was writing as it died) are removed; the areas
        mapped here live on while their results are held."""
        if self.pid is not None:
            for path in _leftovers(self.pid):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
