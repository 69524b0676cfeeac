"""Lanes: direct sockets between the processes of a cluster (`--ray`), for the messages of each job.

Ray places, starts, finds and watches the core and the replica actors; but a Ray actor call costs a
millisecond or more on a busy machine, and a job took 4 of them (8 with one local() block). So a front door
talks to the core, and the core to each replica actor, over a lane: one TCP connection (a multiprocessing
`Connection`: length-prefixed pickled messages) to the address Ray reports for the listener's node (127.0.0.1
on a loopback cluster). A lane is authenticated: the listener draws a random token, the dialer gets it through
Ray, and on connecting each end proves it holds the token (an HMAC of the other's fresh nonce, its role
mixed in so a proof cannot be reflected back); nothing else is read from an unproven peer. Where no lane
can be opened (no route between the nodes, a firewall) the callers fall back to Ray calls.

`Listener` and `dial` open lanes (a listener holds a bounded number at once); `Calls` and `serve_calls` carry
method calls on an object across them (a front door's calls on the core), and posts: calls nobody waits for. Imports the standard library and the server's errors (and ray lazily, for the
node address).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .errors import CallFailed, LaneBroken, LaneUnavailable

__all__ = ["Listener", "dial", "new_token", "hang_up", "Calls", "serve_calls"]

_log = logging.getLogger("tether.server")
DIAL_TIMEOUT = 5.0  # s: connecting to a listener (a node that cannot be reached is then served by Ray calls)
PROOF_TIMEOUT = 10.0  # s: each end's whole proof of the token on a new lane
IDLE_LANES = 64  # a caller's connections kept open for its next calls (one per call in flight)
MAX_LANES = 256  # connections a listener holds at once, proving or served (each has its thread): more are refused
MAX_PROVING = 16  # of those, connections still proving their token (a peer that stalls holds one PROOF_TIMEOUT)
_NONCE = 32


def new_token() -> bytes:
    return secrets.token_bytes(32)


def _node_address() -> str:
    """The address Ray reports for this node (what the other processes of the cluster reach it at)."""
    import ray

    return ray.util.get_node_ip_address()


def _prove(sock: socket.socket, token: bytes, listening: bool) -> None:
    """Both ends at once: send a nonce, answer the peer's with an HMAC, check the peer's answer to ours. On the
    bare socket, all within PROOF_TIMEOUT (a peer that sends part of a message and stalls holds no thread past
    it), in Connection's framing (a 4-byte length, then the bytes); messages of any other length are refused
    unread."""
    deadline = time.monotonic() + PROOF_TIMEOUT
    mine, theirs = (b"L", b"D") if listening else (b"D", b"L")
    nonce = os.urandom(_NONCE)
    _send(sock, nonce, deadline)
    _send(sock, hmac.new(token, mine + _read(sock, _NONCE, deadline), hashlib.sha256).digest(), deadline)
    expected = hmac.new(token, theirs + nonce, hashlib.sha256).digest()
    if not hmac.compare_digest(_read(sock, len(expected), deadline), expected):
        raise ConnectionError("the peer does not hold this lane's token")


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(_left(deadline))
    sock.sendall(struct.pack("!i", len(data)) + data)


def _read(sock: socket.socket, size: int, deadline: float) -> bytes:
    """One proof message of `size` bytes."""
    (length,) = struct.unpack("!i", _exactly(sock, 4, deadline))
    if length != size:
        raise ConnectionError("a malformed proof")
    return _exactly(sock, size, deadline)


def _exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = b""
    while len(data) < size:
        sock.settimeout(_left(deadline))
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            raise ConnectionError("the peer did not prove it holds the lane's token in time") from None
        if not chunk:
            raise ConnectionError("the peer closed the connection before its proof")
        data += chunk
    return data


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ConnectionError("the peer did not prove it holds the lane's token in time")
    return left


def _stream(sock: socket.socket) -> Connection:
    """The socket, blocking and without Nagle's delay (each message is one write), as a Connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return Connection(sock.detach())


class Listener:
    """Accepts lanes on this node's address; each proven one goes to `on_lane(conn)`, in its own thread (which
    it may keep: the core serves a front door's calls there, a replica actor its worker loop). At most
    `max_lanes` connections have a thread at once, MAX_PROVING of them unproven: one past either is closed at
    once (its dialer's `dial` fails, and Ray carries that call), so a flood of connections cannot take the
    process's threads."""

    def __init__(self, token: bytes, on_lane: Callable[[Connection], None], name: str, host: str = "",
                 max_lanes: int = MAX_LANES):
        host = host or _node_address()
        self._token, self._on_lane, self._name = token, on_lane, name
        self._lanes = threading.BoundedSemaphore(max_lanes)
        self._proving = threading.BoundedSemaphore(min(MAX_PROVING, max_lanes))
        self._refusing = False  # (the accept thread's: a refusal is logged once per run of them)
        self._sock = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.address = (host, self._sock.getsockname()[1])
        threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError:  # closed
                return
            if not self._lanes.acquire(blocking=False):
                self._refuse(sock, "lanes")
            elif not self._proving.acquire(blocking=False):
                self._lanes.release()
                self._refuse(sock, "unproven connections")
            else:
                self._refusing = False
                threading.Thread(target=self._admit, args=(sock,), name=self._name, daemon=True).start()

    def _refuse(self, sock: socket.socket, what: str) -> None:
        if not self._refusing:
            _log.warning("%s: refusing connections: as many %s as it holds at once are open", self._name, what)
        self._refusing = True
        sock.close()

    def _admit(self, sock: socket.socket) -> None:
        try:
            try:
                _prove(sock, self._token, listening=True)
            except (OSError, ConnectionError) as error:
                _log.warning("%s: refused a connection: %s", self._name, error)
                sock.close()
                return
            finally:
                self._proving.release()
            self._on_lane(_stream(sock))
        finally:
            self._lanes.release()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # (wakes the accept)
        except OSError:
            pass
        self._sock.close()


def dial(address: tuple[str, int], token: bytes) -> Connection:
    """A lane to the listener at `address` holding `token`; OSError (or ConnectionError) if none can be opened."""
    sock = socket.create_connection(address, timeout=DIAL_TIMEOUT)
    try:
        _prove(sock, token, listening=False)
    except BaseException:
        sock.close()
        raise
    return _stream(sock)


def hang_up(conn: Connection) -> None:
    """Shut the lane's socket down: a reader blocked on either end sees EOF. Its descriptor stays open (another
    thread may be reading it; a closed number could be reused under it) until its owner closes `conn`."""
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except (OSError, ValueError):  # closed already
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


# ---- calls across a lane --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Raised:
    text: str


class _Lane:
    """A caller's lane, with a poll object kept for it (Connection.poll builds a selector at each call)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._poll = select.poll()
        self._poll.register(conn.fileno(), select.POLLIN)

    def readable(self, timeout: float) -> bool:
        return bool(self._poll.poll(max(0, int(timeout * 1000))))


class Calls:
    """Method calls on an object `serve_calls` serves at `address`: one lane per call in flight, kept open
    for the next call (a call is then one write and one read each way), and one lane for posts (calls whose
    answer nobody waits for: one write). Thread-safe."""

    def __init__(self, address: tuple[str, int], token: bytes):
        self.address, self._token = address, token
        self._idle: list[_Lane] = []  # guarded by _lock
        self._lock = threading.Lock()
        self._closed = False  # guarded by _lock: close() was called (a lane is then closed after its call)
        self._posts: Connection | None = None  # guarded by _post_lock: the lane that carries posts, once opened
        self._post_lock = threading.Lock()
        self._opened = False  # a lane was opened once: a later refusal is for that call only
        self.unusable = ""  # why no lane can be opened (then every call raises LaneUnavailable)

    def __call__(self, method: str, args: tuple, timeout: float) -> Any:
        request = self._request(method, args, True)
        lane = self._lane()
        try:
            lane.conn.send_bytes(request)
            if not lane.readable(timeout):
                raise TimeoutError(f"no answer within {timeout:g} s")
            answer = lane.conn.recv()
        except BaseException as error:
            lane.conn.close()
            raise LaneBroken(f"{type(error).__name__}: {error}") from None
        with self._lock:
            if not self._closed and len(self._idle) < IDLE_LANES:
                self._idle.append(lane)
                lane = None
        if lane is not None:
            lane.conn.close()
        if isinstance(answer, _Raised):
            raise CallFailed(answer.text)
        return answer

    def post(self, method: str, args: tuple) -> None:
        """Make a call without waiting for it to run (nor hearing of its failure): posts run one at a time in
        the order they were posted (calls made meanwhile go on other lanes, and may run first). LaneUnavailable:
        it was not sent; LaneBroken: it may have been."""
        request = self._request(method, args, False)
        with self._post_lock:
            if self._posts is None:
                self._posts = self._lane().conn
            try:
                self._posts.send_bytes(request)
            except BaseException as error:
                self._posts.close()
                self._posts = None
                raise LaneBroken(f"{type(error).__name__}: {error}") from None

    def _request(self, method: str, args: tuple, answered: bool) -> bytes:
        if self.unusable:
            raise LaneUnavailable(self.unusable)
        try:
            return pickle.dumps((method, args, answered), pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            raise LaneUnavailable(f"its arguments do not pickle: {error}") from None

    def _lane(self) -> _Lane:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            conn = dial(self.address, self._token)
        except (OSError, ConnectionError) as error:
            why = f"cannot open a lane to {self.address[0]}:{self.address[1]}: {error}"
            if not self._opened:  # never reached: none can be (a refusal once lanes work is the listener's cap)
                self.unusable = why
            raise LaneUnavailable(why) from None
        self._opened = True
        return _Lane(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self._closed = self._idle, [], True
        with self._post_lock:
            posts, self._posts = self._posts, None
        for conn in [lane.conn for lane in idle] + ([posts] if posts is not None else []):
            conn.close()


def serve_calls(conn: Connection, target: Any, methods: frozenset[str]) -> None:
    """Answer the calls that come over `conn` with `target`'s `methods` (only those), one at a time, until the
    caller hangs up; a post (a call not answered) that fails is logged."""
    while True:
        try:
            method, args, answered = conn.recv()
        except Exception:  # hung up (EOFError, OSError), or a request that does not read: the lane is done
            break
        try:
            if method not in methods:
                raise AttributeError(f"{method!r} is not served over a lane")
            answer = getattr(target, method)(*args)
        except Exception as error:
            answer = _Raised(repr(error))
        if not answered:
            if isinstance(answer, _Raised):
                _log.warning("a call posted over a lane failed: %s: %s", method, answer.text)
            continue
        try:
            data = pickle.dumps(answer, pickle.HIGHEST_PROTOCOL)  # (plain pickle: what `Connection.recv` reads)
        except Exception as error:
            data = pickle.dumps(_Raised(f"its answer does not pickle: {error!r}"))
        try:
            conn.send_bytes(data)
        except OSError:
            break
    conn.close()
