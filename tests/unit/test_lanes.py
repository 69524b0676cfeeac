"""Lanes (server/lanes.py), on real sockets on 127.0.0.1: calls answered across them, only from a peer that
proves it holds the token, only for the methods served; what a caller may retry another way is told apart
from a call that may have run."""

from __future__ import annotations

import queue
import socket
import threading
import time

import pytest

from tether.server.errors import CallFailed, LaneBroken, LaneUnavailable
from tether.server.lanes import Calls, Listener, dial, hang_up, new_token, serve_calls


class _Target:
    def __init__(self):
        self.calls: list[tuple] = []
        self.changed = threading.Condition()

    def add(self, a, b):
        with self.changed:
            self.calls.append(("add", a, b))
            self.changed.notify_all()
        return a + b

    def fail(self):
        raise KeyError("no such job")

    def secret(self):
        return "never over a lane"

    def wait(self, event: str):
        _released[event].wait(10)
        return event


_released: dict[str, threading.Event] = {}


@pytest.fixture()
def served():
    target, token = _Target(), new_token()
    listener = Listener(token, lambda conn: serve_calls(conn, target, frozenset({"add", "fail", "wait"})),
                        "test-lane", host="127.0.0.1")
    calls = Calls(listener.address, token)
    yield target, listener, calls, token
    calls.close()
    listener.close()


def test_calls_are_answered_and_lanes_reused(served):
    target, _, calls, _ = served
    assert [calls("add", (i, 1), 5) for i in range(20)] == list(range(1, 21))
    assert calls("add", (b"x" * (3 << 20), b"y"), 5) == b"x" * (3 << 20) + b"y"  # a large argument and answer
    assert len(calls._idle) == 1  # one call at a time: one lane, reused
    assert len(target.calls) == 21


def test_concurrent_calls_each_get_their_own_answer(served):
    _, _, calls, _ = served
    _released.update(first=threading.Event(), second=threading.Event())
    answers: queue.SimpleQueue = queue.SimpleQueue()
    threads = [threading.Thread(target=lambda e=e: answers.put(calls("wait", (e,), 10))) for e in ("first", "second")]
    for thread in threads:
        thread.start()
    _released["second"].set()
    assert answers.get(timeout=10) == "second"  # (the first still waits on its own lane)
    _released["first"].set()
    assert answers.get(timeout=10) == "first"
    for thread in threads:
        thread.join(10)
    assert len(calls._idle) == 2


def test_an_error_and_a_method_not_served_come_back_as_call_failed(served):
    _, _, calls, _ = served
    with pytest.raises(CallFailed, match="no such job"):
        calls("fail", (), 5)
    with pytest.raises(CallFailed, match="'secret' is not served"):
        calls("secret", (), 5)
    assert calls("add", (2, 3), 5) == 5  # the lane still serves


def test_a_peer_without_the_token_is_refused_and_never_served(served):
    target, listener, _, _ = served
    with pytest.raises((ConnectionError, EOFError, OSError)):
        dial(listener.address, new_token())
    with pytest.raises(LaneUnavailable):  # nothing reached the target: the caller may go another way
        Calls(listener.address, new_token())("add", (1, 2), 5)
    raw = socket.create_connection(listener.address)  # no proof at all: bytes that are not one
    raw.sendall(b"\x00\x00\x00\x05hello" * 20)
    raw.close()
    assert target.calls == []


def test_what_cannot_reach_the_other_end_is_unavailable_and_a_broken_lane_is_not(served):
    _, listener, calls, token = served
    with pytest.raises(LaneUnavailable, match="pickle"):
        calls("add", (lambda: 1, 2), 5)
    assert not calls.unusable  # (its arguments only)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    nowhere = Calls(("127.0.0.1", port), token)
    with pytest.raises(LaneUnavailable):
        nowhere("add", (1, 2), 5)
    assert nowhere.unusable
    _released["late"] = threading.Event()
    with pytest.raises(LaneBroken, match="no answer"):  # sent: it may have run
        calls("wait", ("late",), 0.2)
    _released["late"].set()


def test_hang_up_wakes_a_reader_on_either_end():
    token, accepted = new_token(), queue.SimpleQueue()
    listener = Listener(token, accepted.put, "test-lane", host="127.0.0.1")
    try:
        ours = dial(listener.address, token)
        theirs = accepted.get(timeout=10)
        read: queue.SimpleQueue = queue.SimpleQueue()

        def reader():
            try:
                theirs.recv()
            except EOFError as error:
                read.put(error)

        thread = threading.Thread(target=reader)
        thread.start()
        hang_up(ours)
        assert isinstance(read.get(timeout=10), EOFError)
        thread.join(10)
        ours.close()
        theirs.close()
    finally:
        listener.close()


def test_a_peer_that_stalls_inside_its_proof_is_cut_off(served, monkeypatch):
    """A peer that sends part of a proof and then nothing holds no thread of the listener past the proof's
    time limit (each unproven connection has its thread: they must not pile up)."""
    import tether.server.lanes as lanes

    _, listener, calls, _ = served
    monkeypatch.setattr(lanes, "PROOF_TIMEOUT", 0.5)
    raw = socket.create_connection(listener.address)
    raw.sendall(b"\x00\x00")  # half a length header, then silence
    raw.settimeout(30)
    received = b""
    while chunk := raw.recv(4096):  # the listener's nonce, then its end of the connection
        received += chunk
    raw.close()
    assert len(received) == 4 + 32
    assert calls("add", (1, 2), 5) == 3



def test_a_listener_holds_at_most_its_cap_of_lanes_and_refuses_the_rest_until_one_ends():
    """Each connection has a listener thread: past its cap a connection is closed at once (no thread piles up).
    A caller whose lanes worked before takes such a refusal for that call only (Ray carries it), not for good."""
    token, target = new_token(), _Target()
    listener = Listener(token, lambda conn: serve_calls(conn, target, frozenset({"add"})), "test-lane",
                        host="127.0.0.1", max_lanes=2)
    calls = Calls(listener.address, token)
    try:
        assert calls("add", (1, 2), 5) == 3  # its lane stays open, idle
        held = dial(listener.address, token)  # the second: the cap is reached
        with pytest.raises((ConnectionError, EOFError, OSError)):
            dial(listener.address, token)
        fresh = Calls(listener.address, token)
        with pytest.raises(LaneUnavailable):
            fresh("add", (1, 2), 5)
        assert fresh.unusable  # (it never opened one: no lane can be, as far as it knows)
        kept = calls._idle.pop()  # (so its next call needs a new lane)
        with pytest.raises(LaneUnavailable):
            calls("add", (1, 2), 5)
        assert not calls.unusable
        held.close()  # its listener thread ends, and with it its hold on the cap
        deadline = time.monotonic() + 10
        while True:
            try:
                assert calls("add", (5, 6), 5) == 11
                break
            except LaneUnavailable:
                assert time.monotonic() < deadline, "the listener never took a lane again"
        kept.conn.close()
    finally:
        calls.close()
        listener.close()


def test_posts_run_in_the_order_they_were_posted_without_an_answer_and_calls_still_answer(served):
    """A post is one write (a local() answer from a door to the core): nothing comes back on its lane, so the
    lane's next message is the next post's, and calls made meanwhile are answered on their own lanes."""
    target, _, calls, _ = served
    for i in range(30):
        calls.post("add", (i, 0))
    calls.post("fail", ())  # (a failed post is logged where it ran: nothing comes back)
    assert calls("add", (100, 0), 5) == 100
    for i in range(30, 40):
        calls.post("add", (i, 0))
    with target.changed:  # (posts are not waited for: wait for the target to have run them)
        assert target.changed.wait_for(lambda: len(target.calls) == 41, 10), target.calls
    posted = [call[1] for call in target.calls if call[1] != 100]
    assert posted == list(range(40))
