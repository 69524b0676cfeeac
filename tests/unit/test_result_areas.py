"""Result areas: a worker's large results cross in reusable shared memory, handed back only once nobody reads them.

Both sides run in this process (as with a worker thread); the worker's end sees only what the protocol messages
carry, as it would through the pipe.
"""

from __future__ import annotations

import gc
import os

import pytest

from tether.server import worker_protocol as wp
from tether.server.result_areas import GRANULE, KEEP_IDLE, DoorAreas, WorkerAreas

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="result areas need /dev/shm")

BIG = wp.SHM_THRESHOLD + 1000


def _pieces(seed: int, size: int = BIG) -> list:
    data = bytes((seed + i) % 251 for i in range(251)) * (size // 251 + 1)
    return [data[:100], memoryview(data)[100:size]]


def test_a_small_result_goes_as_bytes():
    assert WorkerAreas().pack([b"ab", memoryview(b"cd")]) == b"abcd"
    assert bytes(DoorAreas().result(b"abcd").tobytes()) == b"abcd"


def test_a_large_result_is_read_from_the_area_whose_file_is_gone_once_mapped():
    worker, door = WorkerAreas(), DoorAreas()
    area = worker.pack(_pieces(1))
    assert isinstance(area, wp.Area) and area.size == BIG and area.capacity % GRANULE == 0
    result = door.result(area)
    assert not os.path.exists(area.path)  # unlinked: freed with the last map of it
    assert result.tobytes() == b"".join(bytes(p) for p in _pieces(1))


def test_an_area_is_written_again_only_after_its_result_is_gone_and_handed_back():
    worker, door = WorkerAreas(), DoorAreas()
    first = door.result(worker.pack(_pieces(1)))
    assert door.reclaim() is None  # its result is held: nothing goes back
    second_area = worker.pack(_pieces(2))  # so the worker takes another area
    second = door.result(second_area)
    assert first.tobytes() == b"".join(bytes(p) for p in _pieces(1))  # untouched by the second result
    del first
    gc.collect()
    reclaim = door.reclaim()
    assert reclaim is not None and len(reclaim.reuse) == 1 and not reclaim.drop
    worker.reclaim(reclaim)
    third_area = worker.pack(_pieces(3))
    assert third_area.path == reclaim.reuse[0] and third_area.path != second_area.path  # written again
    third = door.result(third_area)
    assert third.tobytes() == b"".join(bytes(p) for p in _pieces(3))
    assert second.tobytes() == b"".join(bytes(p) for p in _pieces(2))


def test_a_smaller_result_reuses_a_larger_area_and_a_larger_one_gets_a_new_area():
    worker, door = WorkerAreas(), DoorAreas()
    area = worker.pack(_pieces(1, GRANULE + 10))
    door.discard(area)  # (a result no job holds: handed back at once)
    worker.reclaim(door.reclaim())
    small = worker.pack(_pieces(2))
    assert small.path == area.path and small.size == BIG
    assert door.result(small).tobytes() == b"".join(bytes(p) for p in _pieces(2))
    large = worker.pack(_pieces(3, 2 * GRANULE + 10))
    assert large.path != area.path and large.capacity == 3 * GRANULE
    door.discard(large)


def test_a_worker_keeps_only_a_few_free_areas():
    worker, door = WorkerAreas(), DoorAreas()
    areas = [worker.pack(_pieces(i)) for i in range(KEEP_IDLE + 2)]
    for area in areas:
        door.discard(area)
    reclaim = door.reclaim()
    assert len(reclaim.reuse) == KEEP_IDLE and len(reclaim.drop) == 2
    worker.reclaim(reclaim)
    again = [worker.pack(_pieces(9)) for _ in range(KEEP_IDLE + 1)]
    paths = {area.path for area in again}
    assert set(reclaim.reuse) < paths and not paths & set(reclaim.drop)  # the dropped ones are closed
    for area in again:
        door.discard(area)


def test_a_dead_workers_unread_files_are_removed():
    pid = 2**22 + 12345  # no such process: its files are what a worker leaves when killed mid-result
    left = [f"/dev/shm/tether-{pid}-area-0", f"/dev/shm/tether-{pid}-7", f"/dev/shm/tether-{pid}1-area-0"]
    for path in left:
        open(path, "wb").close()
    try:
        DoorAreas(pid).close()
        assert [os.path.exists(p) for p in left] == [False, False, True]  # (another pid's file stays)
    finally:
        for path in left:
            if os.path.exists(path):
                os.unlink(path)


def test_the_largest_free_areas_are_kept():
    worker, door = WorkerAreas(), DoorAreas()
    small = [worker.pack(_pieces(i)) for i in range(KEEP_IDLE)]
    for area in small:
        door.discard(area)
    worker.reclaim(door.reclaim())  # the worker keeps these small ones
    large = worker.pack(_pieces(5, 2 * GRANULE + 10))  # fits none of them: a new area
    door.discard(large)
    reclaim = door.reclaim()
    assert reclaim.reuse == (large.path,)
    assert len(reclaim.drop) == 1 and reclaim.drop[0] in {a.path for a in small}  # a small free one goes
    worker.reclaim(reclaim)
    again = worker.pack(_pieces(6, 2 * GRANULE))
    assert again.path == large.path
    door.discard(again)
