"""Replicas on a Ray cluster (`tether serve --ray ADDRESS`): each replica's worker runs as a Ray actor hosting
the same job loop as a local worker process (`worker_main.serve`), and the replica's supervisor
(`supervisor.Replica`, in the cluster's core) relays it through a connection with the Pipe's
send/recv/poll/fileno (actor_links.py: a lane, else Ray calls), so its relay, time limits, cancels and crash
handling are the ones local workers get. Here: joining the cluster, the actor, and its start and end.
Imports ray (lazily), the protocol, actor_links, lanes and the supervisor; never grpc's server nor the job
store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from . import worker_protocol as wp
from .actor_links import (
    PULLS,
    ActorConnection,
    ActorSide,
    Answers,
    DirectLane,
    LaneConnection,
    LaneSide,
    why_dead,
)
from .lanes import PROOF_TIMEOUT, Listener, dial, hang_up, new_token
from .supervisor import Replica

__all__ = ["connect", "RayReplica", "ReplicaActor", "PickledModel", "gpus_of"]

_log = logging.getLogger("tether.server")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_connect_lock = threading.Lock()
_DIRECT, _MAIN = b"direct", b"main"  # the first message on each of a supervisor's two lanes to its actor


def connect(address: str) -> None:
    """Join the Ray cluster at `address` once per process: `auto` (RAY_ADDRESS, else the one `ray start` started
    on this machine), `host:port`, or `local` (a private Ray instance for this server, on loopback). A loopback
    address stays on loopback (Ray would otherwise swap it for the machine's network address)."""
    if _host_of(_resolved(address)) in _LOOPBACK:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # (read when ray is first imported)
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray on this machine: pip install 'tether[cluster]'") from None

    with _connect_lock:
        if ray.is_initialized():
            return
        if address != "local":
            _check_reachable(address, _resolved(address))
        if address == "local":
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address)


def _check_reachable(address: str, resolved: str) -> None:
    """Fail at once, with the fix, where no Ray head answers (Ray itself would retry for minutes)."""
    if resolved.startswith("ray://"):
        return
    if not resolved:
        raise ConnectionError(f"--ray {address}: no Ray cluster found on this machine (no RAY_ADDRESS, nothing "
                              "started by `ray start --head`); start one, or give its head's HOST:PORT")
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as error:
        raise ConnectionError(f"--ray {address}: no Ray head answers at {resolved} ({error}); start one with "
                              "`ray start --head`, or give the HOST:PORT of a running one") from None


def _resolved(address: str) -> str:
    """What Ray will dial for `address` (`auto`: RAY_ADDRESS, else the address file `ray start` wrote)."""
    if address == "local":
        return "127.0.0.1"
    if address != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        with open(os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")) as file:
            return file.read().strip()
    except OSError:
        return ""


def _host_of(address: str) -> str:
    address = address.removeprefix("ray://")
    return address.rpartition(":")[0].strip("[]") if address.count(":") >= 1 else address


@dataclasses.dataclass(frozen=True)
class PickledModel:
    """A replica's payload as bytes (Ray's cloudpickle): what the cluster's core keeps of a model in the object
    store without ever loading it (it may need GPUs, or memory, that the core does not have)."""

    data: bytes

    @classmethod
    def of(cls, payload: Any) -> PickledModel:
        from ray import cloudpickle

        return cls(cloudpickle.dumps(payload))

    def load(self) -> Any:
        import pickle

        return pickle.loads(self.data)


class ReplicaActor:
    """A Ray actor hosting one replica's worker loop (`worker_main.serve`) in a thread, once its supervisor has
    opened its two lanes to it (`lane()`: where; the token came with the constructor's arguments): the direct
    one, read by the job thread itself (jobs, local() answers), then the main one (the worker's messages, and
    cancels), or, where it cannot, asked for Ray calls instead (`use_ray`, then `put` and `take`). Made a Ray
    actor class by `_actor_class()` (so this module imports without ray)."""

    def __init__(self, name: str, payload: Any, source: Any, policy: Any, token: bytes = b""):
        if isinstance(payload, PickledModel):
            payload = payload.load()
        self._serving = (name, payload, source, policy)
        self._claimed = threading.Lock()  # taken by the first way the supervisor connects (the only one served)
        self._ended = threading.Event()  # the worker loop ended
        self._side = ActorSide()
        self._direct: Any = None  # guarded by _lanes: the direct lane, once it came
        self._lanes = threading.Condition()
        self._listener: Listener | None = None
        if token:
            try:
                self._listener = Listener(token, self._on_lane, f"tether-worker-{name}")
            except OSError as error:
                _log.warning("the actor of %s cannot listen for its supervisor (%s): Ray calls carry its messages",
                             name, error)

    def lane(self) -> tuple[str, int] | None:
        """Where the supervisor opens its lanes (None: this actor could not listen)."""
        return self._listener.address if self._listener is not None else None

    def _on_lane(self, conn: Any) -> None:
        """A proven lane: its first message says which it is. The direct lane is kept; the main one then serves
        the worker loop, in its own thread (the supervisor opens the direct lane first)."""
        try:
            role = conn.recv_bytes(len(_DIRECT)) if conn.poll(PROOF_TIMEOUT) else b""
        except (EOFError, OSError):
            role = b""
        if role == _DIRECT:
            with self._lanes:
                if self._direct is None:
                    self._direct = conn
                    self._lanes.notify_all()
                    return
        if role != _MAIN or not self._claimed.acquire(blocking=False):
            conn.close()
            return
        self._listener.close()
        with self._lanes:
            self._lanes.wait_for(lambda: self._direct is not None, PROOF_TIMEOUT)
            direct = self._direct
        if direct is None:  # (the supervisor reads EOF on its main lane: this actor's start fails)
            conn.close()
            return
        self._serve(LaneSide(conn), direct)

    def use_ray(self) -> None:
        """No lane could be opened: the worker's messages go by `put` and `take`."""
        if self._claimed.acquire(blocking=False):
            if self._listener is not None:
                self._listener.close()
            threading.Thread(target=self._serve, args=(self._side,), name=f"tether-worker-{self._serving[0]}",
                             daemon=True).start()

    def _serve(self, side: Any, direct: Any = None) -> None:
        from .worker_main import serve

        try:
            serve(side, *self._serving, direct)
        except BaseException:
            _log.exception("the worker of %s failed", self._serving[0])
        finally:
            side.close()
            if direct is not None:
                hang_up(direct)
            self._ended.set()

    def ended(self) -> None:
        """Answers once the worker loop has ended; Ray fails the call if the actor dies first (how the
        supervisor learns why)."""
        self._ended.wait()

    def put(self, seq: int, message: Any) -> None:
        """A message from the supervisor (`seq` orders them: the actor runs calls on several threads)."""
        self._side.deliver(seq, message)

    def take(self, timeout: float) -> list:
        return self._side.take(timeout)

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()


_actor_cls: Any = None


def _actor_class():
    global _actor_cls
    if _actor_cls is None:
        import ray

        _actor_cls = ray.remote(max_concurrency=PULLS + 2, max_restarts=0)(ReplicaActor)  # (+ puts, or ended)
    return _actor_cls


class _ActorProcess:
    """What the supervisor reads of a worker process, for an actor: pid, is_alive, sentinel, kill, join."""

    def __init__(self, actor: Any, conn: Any, pid: int | None):
        self.actor, self.conn, self.pid = actor, conn, pid
        self.exitcode = None

    @property
    def sentinel(self) -> int:
        return self.conn.sentinel

    def is_alive(self) -> bool:
        return self.conn is None or not self.conn.death

    def kill(self) -> None:
        import ray

        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone
            pass

    def join(self, timeout: float | None = None) -> None:
        if self.conn is not None:
            self.conn.wait_death(timeout)


class RayReplica(Replica):
    """A replica whose worker is a Ray actor (with the model's GPUs as its resources); the relay is Replica's."""

    def __init__(self, queue, index: int, policy):
        self._stored_payload: Any = None  # the replica's model in the object store, put once (restarts reuse it)
        self._here = False  # whether the actor runs on this machine (its memory is then read from /proc)
        connect(queue.limits.ray)
        super().__init__(queue, index, policy)

    def _start(self) -> None:
        import ray

        hosted = self.queue.hosted
        with self._ready:
            self._pid = None
        if self._stored_payload is None:  # (a model the cluster holds is in the object store already)
            shipped = isinstance(self._payload, ray.ObjectRef)
            self._stored_payload = self._payload if shipped else ray.put(self._payload)
        gpus = getattr(hosted, "gpus", None)
        # listed by `ray list actors`: the front doors' namespace, the replica, and this start of it
        name = f"tether/{self.queue.limits.ray_namespace}/{self.name}/{uuid.uuid4().hex[:8]}"
        token = new_token() if self.queue.limits.ray_lanes else b""  # (no token: the actor does not listen)
        actor = _actor_class().options(num_cpus=1, num_gpus=gpus_of(self._payload) if gpus is None else gpus,
                                       name=name).remote(hosted.name, self._stored_payload, hosted.source,
                                                         self.policy, token)
        self.process = _ActorProcess(actor, None, None)
        give_up = time.monotonic() + _start_timeout()
        try:
            conn, self.direct, node = self._connect(actor, token, give_up)
            self.conn = self.process.conn = conn
            while not conn.poll(0.2) and not conn.death:
                self._starting(give_up)
            try:
                ready = conn.recv()
            except EOFError as error:
                raise RuntimeError(f"{error} while it started (see the Ray logs)") from None
        except BaseException:
            self._kill()
            raise
        assert isinstance(ready, wp.Ready), ready
        self._here = ray.util.get_node_ip_address() == (node or _actor_node_ip(actor))
        self.process.pid = ready.pid
        with self._ready:
            self._pid = ready.pid
            self._ready.notify_all()

    def _starting(self, give_up: float) -> None:
        """Raise if the actor must stop starting (the server stopped, or it took too long)."""
        if self.queue.closed:
            raise RuntimeError("the server stopped while the worker started")
        if time.monotonic() > give_up:
            raise RuntimeError(f"its Ray actor did not start within {_start_timeout():g} s")

    def _connect(self, actor: Any, token: bytes, give_up: float) -> tuple[Any, Any, str | None]:
        """The connection to the actor, its direct path, and its node's address where known: two lanes (the
        direct one first), else Ray calls."""
        import ray
        from ray.exceptions import RayActorError

        asked = actor.lane.remote()  # (answered once the actor has loaded its model)
        try:
            while not ray.wait([asked], timeout=0.2)[0]:
                self._starting(give_up)
            address = ray.get(asked)
        except RayActorError as error:
            raise RuntimeError(f"{why_dead(error)} while it started (see the Ray logs)") from None
        if address is not None:
            opened = []
            try:
                for role in (_DIRECT, _MAIN):
                    opened.append(dial(tuple(address), token))
                    opened[-1].send_bytes(role)
                direct, main = opened
                return LaneConnection(actor, main, self.name, direct), DirectLane(direct), address[0]
            except (OSError, ConnectionError) as error:
                for lane in opened:
                    lane.close()
                _log.warning("no lane to the actor of %s at %s:%s (%s): Ray calls carry its messages", self.name,
                             address[0], address[1], error)
        actor.use_ray.remote()
        conn = ActorConnection(actor, self.name)
        return conn, Answers(conn), None

    def private_memory(self, pid: int) -> int:
        """An actor on this machine is measured like a worker process; one on another node is left to Ray's
        memory monitor (it kills the actor: the job then fails as crashed)."""
        return super().private_memory(pid) if self._here else 0

    def _kill(self) -> None:
        with self._ready:
            self._pid = None
        if self.process is not None:
            self.process.kill()
            self.process.join(5.0)
            if self.process.conn is not None:
                self.process.conn.close()

    def _how_it_ended(self) -> str:
        if self.process is None:
            return "its Ray actor was not started"
        self.process.join(1.0)
        return (self.process.conn and self.process.conn.death) or "its Ray actor stopped"


def _actor_node_ip(actor: Any) -> str | None:
    import ray

    try:
        return ray.get(actor.node_ip.remote(), timeout=10)
    except Exception:
        return None


def _start_timeout() -> float:
    from .supervisor import START_TIMEOUT

    return START_TIMEOUT


def gpus_of(payload: Any) -> int:
    """GPUs the actor asks Ray for: the CUDA devices the model's parameters are on (its device options)."""
    module = payload[0] if isinstance(payload, tuple) else payload
    return len({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
