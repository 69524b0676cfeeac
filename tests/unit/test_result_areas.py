"""Result areas (server/result_areas.py), both sides in one process: an area a result was read from goes back
to the worker once the result is gone, whichever thread drops it and however (the cyclic collector included)."""

from __future__ import annotations

import gc
import threading

import pytest

from tether.server import worker_protocol as wp
from tether.server.result_areas import DoorAreas, WorkerAreas
from tether.server.worker_protocol import SHM_DIR

pytestmark = pytest.mark.skipif(SHM_DIR is None, reason="no /dev/shm")


def _area(worker: WorkerAreas, fill: int) -> wp.Area:
    area = worker.pack([bytes([fill]) * (wp.SHM_THRESHOLD + 1)])
    assert isinstance(area, wp.Area)
    return area


def _reclaim_while_collecting(door: DoorAreas, allocations: int) -> wp.Reclaim | None:
    """door.reclaim(), the collector due after `allocations` more objects (so it runs inside the reclaim at
    some `allocations`); raises if the reclaim does not end."""
    reclaims: list = []

    def reclaim():
        gc.set_threshold(gc.get_count()[0] + allocations)
        gc.enable()
        reclaims.append(door.reclaim())

    thread = threading.Thread(target=reclaim, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), f"the reclaim deadlocked on a result the collector freed inside it ({allocations})"
    return reclaims[0]


def test_a_result_the_collector_frees_inside_a_reclaim_is_handed_back_and_the_reclaim_ends():
    thresholds = gc.get_threshold()
    worker, door = WorkerAreas(), DoorAreas()
    try:
        for allocations in range(12):
            first, second = _area(worker, 1), _area(worker, 2)
            door.discard(first)  # released: the reclaim has work to do
            cycle: list = [door.result(second)]  # a result only the collector frees
            cycle.append(cycle)
            del cycle
            gc.disable()
            reclaims = [_reclaim_while_collecting(door, allocations)]
            gc.set_threshold(*thresholds)
            gc.collect()
            reclaims.append(door.reclaim())
            handed = {path for r in reclaims if r is not None for path in (*r.reuse, *r.drop)}
            assert {first.path, second.path} <= handed
            worker.reclaim(wp.Reclaim(tuple(p for r in reclaims if r for p in r.reuse),
                                      tuple(p for r in reclaims if r for p in r.drop)))
    finally:
        gc.set_threshold(*thresholds)
        gc.enable()
