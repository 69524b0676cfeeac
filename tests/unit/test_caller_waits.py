"""A blocking caller's waits (client/channel.py `_LoopThread.call`, client/blocking_stream.py `next_item`) run in
short slices so that Ctrl-C always reaches the caller: what they hand back must be what an endless wait would."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest

from tether.client.blocking_stream import END, SIGNAL_CHECK_S, next_item
from tether.client.channel import _loop


def test_a_loop_call_longer_than_a_slice_returns_its_result():
    async def slow() -> str:
        await asyncio.sleep(3 * SIGNAL_CHECK_S)
        return "done"

    assert _loop().call(slow()) == "done"
    assert _loop().call(slow(), timeout=30.0) == "done"


def test_a_loop_call_keeps_its_timeout_and_the_coroutines_own_timeout_error():
    async def forever() -> None:
        await asyncio.sleep(60)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        _loop().call(forever(), timeout=2.5 * SIGNAL_CHECK_S)
    assert 2.5 * SIGNAL_CHECK_S <= time.monotonic() - started < 30

    async def times_out() -> None:
        await asyncio.sleep(2 * SIGNAL_CHECK_S)
        raise TimeoutError("the coroutine's own")

    with pytest.raises(TimeoutError, match="the coroutine's own"):
        _loop().call(times_out())  # (raised once, not waited on forever)


def test_next_item_hands_over_items_put_after_several_slices_and_raises_errors():
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    timer = threading.Timer(3 * SIGNAL_CHECK_S, lambda: [inbox.put(x) for x in ("a", ValueError("failed"), END)])
    timer.start()
    try:
        assert next_item(inbox) == "a"
        with pytest.raises(ValueError, match="failed"):
            next_item(inbox)
        assert next_item(inbox) is END
    finally:
        timer.cancel()
