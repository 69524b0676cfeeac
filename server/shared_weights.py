"""A replica's CPU weights in one sealed memfd, so a worker process of any model gets them with one file
descriptor, and a restarted worker maps the same pages again (no disk read, no copy). Imports torch and the
standard library only; never grpc, the job store or the protocol.

Why not torch's own sharing: torch.multiprocessing shares each storage as its own file descriptor (a
forkserver passes at most ~250 with a process's arguments; an LLM has hundreds of tensors), and its
`file_system` strategy names each storage in /dev/shm, counts its users in the file itself (a SIGKILLed worker
never gives its count back: files leak) and is process-wide. Both map the one copy MAP_SHARED and writable in
every worker: what a worker writes (a job's in-place write it was killed before undoing, a `.data` write) is
what every later worker reads. Here the memfd is sealed against writes once filled and every process maps it
copy-on-write (MAP_PRIVATE): a write copies the page into the writer alone; the shared pages never change.

`pack(payload)` finds the CPU storages a pickle of the payload (a module, or (module, tokenizer)) reaches,
copies each into the memfd and re-points it at its place there (`UntypedStorage._swap_data_ptr_`, the swap
torch's own `share_memory_()` does), so the front door keeps no second copy and every tensor, view and tied
weight on a storage follows it. `Packed` is what goes to the process: its pickle is the payload's with each
packed storage replaced by (offset, bytes, dtype), plus the memfd; the worker rebuilds every storage as a view
of its private map, so tying, views, strides, buffers and requires_grad come back as they were.
"""

from __future__ import annotations

import ctypes
import fcntl
import io
import mmap
import os
import pickle
from multiprocessing.reduction import DupFd, ForkingPickler
from typing import Any

import torch

__all__ = ["Packed", "pack"]

_ALIGN = 64  # bytes: each storage starts on a cache line (and at least at its dtype's alignment)
_MEMFD = hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")  # Linux; elsewhere torch's own sharing


def _untyped(obj: Any) -> torch.UntypedStorage | None:
    """The untyped storage `obj` is (or wraps), if it is a storage."""
    if isinstance(obj, torch.UntypedStorage):
        return obj
    if isinstance(obj, torch.storage.TypedStorage):
        return obj._untyped_storage
    return None


class _Null:
    def write(self, data) -> None:
        pass


class _Walk(ForkingPickler):
    """Pickles the payload into nothing, to list the non-empty CPU storages a worker would receive (every
    storage is replaced by a placeholder: no file descriptor, no CUDA handle is made)."""

    def __init__(self):
        super().__init__(_Null(), pickle.HIGHEST_PROTOCOL)
        self.found: dict[int, torch.UntypedStorage] = {}  # StorageImpl address -> the storage, in pickle order

    def persistent_id(self, obj: Any) -> Any:
        storage = _untyped(obj)
        if storage is None:
            return None
        if storage.device.type == "cpu" and storage.nbytes():
            self.found.setdefault(storage._cdata, storage)
        return 0


class _Send(ForkingPickler):
    """Pickles the payload with each packed storage as (offset, bytes, dtype); anything else (a CUDA tensor:
    torch's IPC handle) goes as torch's reductions send it."""

    def __init__(self, file, packed: Packed):
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self._packed = packed

    def persistent_id(self, obj: Any) -> Any:
        storage = _untyped(obj)
        if storage is None or storage.device.type != "cpu":
            return None
        offset = self._packed.offset_of(storage)
        if offset is None:
            return None
        dtype = obj.dtype if isinstance(obj, torch.storage.TypedStorage) else None
        return offset, storage.nbytes(), dtype


class _Load(pickle.Unpickler):
    """The worker's side of `_Send`: each storage a view of the private map (one storage per offset, so what
    shared a storage in the front door shares one here)."""

    def __init__(self, data: bytes, mapped: mmap.mmap):
        super().__init__(io.BytesIO(data))
        self._mapped = mapped
        self._storages: dict[int, torch.UntypedStorage] = {}

    def persistent_load(self, pid: Any) -> Any:
        offset, nbytes, dtype = pid
        storage = self._storages.get(offset)
        if storage is None:
            storage = _view(self._mapped, offset, nbytes)
            self._storages[offset] = storage
        if dtype is None:
            return storage
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def _view(mapped: mmap.mmap, offset: int, nbytes: int) -> torch.UntypedStorage:
    """A storage on `nbytes` of the map at `offset` (it keeps the map alive)."""
    return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset).untyped_storage()


class Packed:
    """A payload whose CPU storages live in one sealed memfd; pickled (as a process argument) it sends the
    memfd and the payload's skeleton, and unpickles as the payload, on a private map of the memfd."""

    def __init__(self, payload: Any, fd: int, size: int, base: int):
        self.payload, self.size = payload, size
        self._fd, self._base = fd, base  # the memfd (kept open to send it again); the map's address here

    def offset_of(self, storage: torch.UntypedStorage) -> int | None:
        """Where `storage` lies in the memfd (None: it is not one of the packed ones)."""
        offset = storage.data_ptr() - self._base
        return offset if 0 <= offset and offset + storage.nbytes() <= self.size else None

    def __reduce__(self):
        skeleton = io.BytesIO()
        _Send(skeleton, self).dump(self.payload)  # (in the process's pickle: a CUDA tensor's handle is fresh)
        return _receive, (DupFd(self._fd), self.size, skeleton.getvalue())

    def __del__(self):
        try:
            os.close(self._fd)
        except (OSError, AttributeError):
            pass


def _receive(fd_handle: Any, size: int, skeleton: bytes) -> Any:
    """In the worker: the payload, its packed storages views of a copy-on-write map of the memfd."""
    fd = fd_handle.detach()
    try:
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return _Load(skeleton, mapped).load()


def _write(fd: int, storage: torch.UntypedStorage, offset: int) -> None:
    """Copy the storage's bytes into the memfd at `offset`."""
    view = memoryview((ctypes.c_char * storage.nbytes()).from_address(storage.data_ptr())).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def pack(payload: Any, name: str) -> Packed | None:
    """Move the payload's CPU storages into one sealed memfd, in place (the payload's tensors then read the
    memfd's pages); None when it has none (a model on a GPU goes as torch's IPC handles) or the OS has no
    memfd. Raises what pickling the payload raises (a model that cannot be sent to a process)."""
    walk = _Walk()
    walk.dump(payload)
    if not _MEMFD:
        return None
    storages = list(walk.found.values())
    offsets, size = [], 0
    for storage in storages:
        offsets.append(size)
        size += -(-storage.nbytes() // _ALIGN) * _ALIGN
    if not size:
        return None
    fd = os.memfd_create(f"tether-weights-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = _view(mapped, 0, 1).data_ptr()
        for storage, offset in zip(storages, offsets):
            _write(fd, storage, offset)  # (then read through the map: its pages are the memfd's until written)
            storage._swap_data_ptr_(_view(mapped, offset, storage.nbytes()))  # the old bytes go with the view
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)  # no process can write the shared pages from now on
    except BaseException:
        os.close(fd)
        raise
    return Packed(payload, fd, size, base)
