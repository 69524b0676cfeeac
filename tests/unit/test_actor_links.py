"""The supervisor's end of a replica actor's connection (server/actor_links.py), without Ray: what it closes,
and its direct lane on real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import queue
import threading

import pytest

from tether.server import worker_protocol as wp
from tether.server.actor_links import DirectLane, _Link
from tether.server.lanes import Listener, dial, new_token


def test_closing_a_connection_twice_closes_its_pipes_once():
    """The replica closes its actor's connection when it kills the actor, and again when it is joined or
    restarted: the second close must not close file descriptors that have since been given to other files."""
    link = _Link(actor=None)
    link._end("its worker loop ended")  # (what the thread that watches the actor does as the actor ends)
    link._watched()
    link.close()
    read, write = os.pipe()  # the numbers just freed, given to another file
    try:
        link.close()
        os.fstat(read)
        os.fstat(write)
    finally:
        os.close(read)
        os.close(write)


def test_a_direct_lane_carries_messages_in_order_and_its_close_reads_as_eof_there():
    """The replica's direct lane to its actor (read there by the job thread itself): messages from several threads
    arrive whole and in each sender's order; one sent after the actor is gone is dropped, not raised; closing it
    wakes the reader with EOF."""
    token, accepted = new_token(), queue.SimpleQueue()
    listener = Listener(token, accepted.put, "test-lane", host="127.0.0.1")
    try:
        direct = DirectLane(dial(listener.address, token))
        theirs = accepted.get(timeout=10)
        senders = [threading.Thread(target=lambda k=k: [direct.send(wp.LocalAnswer(f"{k}-{i}", bytes([i]) * 1000))
                                                        for i in range(50)]) for k in range(3)]
        for thread in senders:
            thread.start()
        got = [theirs.recv() for _ in range(150)]
        for thread in senders:
            thread.join(10)
        for k in range(3):
            mine = [answer for answer in got if answer.call_id.startswith(f"{k}-")]
            assert [answer.call_id for answer in mine] == [f"{k}-{i}" for i in range(50)]
            assert all(answer.data == bytes([i]) * 1000 for i, answer in enumerate(mine))
        direct.close()
        with pytest.raises(EOFError):
            theirs.recv()
        theirs.close()
        direct.send(wp.LocalAnswer("late", b"x"))  # (the actor is gone: dropped)
    finally:
        listener.close()
