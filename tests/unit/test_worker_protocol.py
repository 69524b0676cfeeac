"""The worker protocol's bytes: small ones through the pipe, large ones once through shared memory."""

from __future__ import annotations

import multiprocessing
import os

from tether.server import worker_protocol as wp


def test_small_bytes_go_as_they_are():
    assert wp.pack([b"ab", memoryview(b"cd")]) == b"abcd"
    assert wp.unpack(b"abcd") == b"abcd"


def test_large_bytes_cross_through_shared_memory_and_are_freed_with_the_view():
    pieces = [os.urandom(wp.SHM_THRESHOLD), memoryview(os.urandom(1000))]
    blob = wp.pack(pieces)
    assert isinstance(blob, wp.Blob) and blob.size == wp.SHM_THRESHOLD + 1000
    ours, theirs = multiprocessing.Pipe()
    ours.send(wp.Done("job", blob))
    received = theirs.recv()
    view = wp.unpack(received.result)
    assert not os.path.exists(blob.path)  # unlinked once mapped: freed when the view goes
    assert bytes(view) == b"".join(bytes(p) for p in pieces)


def test_a_blob_never_read_can_be_discarded():
    blob = wp.pack([bytes(wp.SHM_THRESHOLD)])
    wp.discard(blob)
    wp.discard(blob)  # twice: nothing left, no error
    assert not os.path.exists(blob.path)
