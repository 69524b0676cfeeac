"""Helpers shared by the remote benchmarks (bench/remote.py, bench/local_blocks.py); not a benchmark itself.

Statistics and formatting, the environment record, interleaved timing, a bare gRPC server and clients (the
floor a tether job is compared with), per-thread CPU accounting from /proc, and a multi-thread cProfile of a
scenario run in a child process (bench/_profile_child.py).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import queue
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 1 << 20  # bytes per message of the bare byte stream (tether's CHUNK_SIZE)

# ---- statistics and formatting -------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between order statistics."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def concurrent_clients(n: int, job: Callable[[int, int], Any], budget_s: float, cap: int,
                       ends: bool = False) -> dict:
    """n threads started together, client i running `job(i, k)` (its k-th job) back to back until the budget
    or its cap of jobs is spent: jobs, jobs/s and per-job latency percentiles (ms); with `ends`, also when each
    job ended (`ends_s`: seconds from the start, in order)."""
    latencies: list[list[float]] = [[] for _ in range(n)]
    ended: list[float] = []
    finished = [0.0] * n
    errors: list[BaseException] = []
    start = threading.Barrier(n + 1)
    deadline = [0.0]

    def client(i: int) -> None:
        try:
            start.wait()
            while time.perf_counter() < deadline[0] and len(latencies[i]) < cap:
                t = time.perf_counter_ns()
                job(i, len(latencies[i]))
                latencies[i].append((time.perf_counter_ns() - t) / 1e6)
                ended.append(time.perf_counter())
        except BaseException as error:  # reported below
            errors.append(error)
        finally:
            finished[i] = time.perf_counter()

    threads = [threading.Thread(target=client, args=(i,), name=f"bench-client-{i}") for i in range(n)]
    for thread in threads:
        thread.start()
    gc.collect()
    deadline[0] = time.perf_counter() + budget_s
    t0 = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    elapsed = max(finished) - t0
    flat = [x for per in latencies for x in per]
    row = {"clients": n, "jobs": len(flat), "seconds": elapsed, "jobs_per_s": len(flat) / elapsed,
           "p50_ms": median(flat), "p99_ms": pct(flat, 99), "min_jobs_per_client": min(len(x) for x in latencies)}
    if ends:
        row["ends_s"] = sorted(end - t0 for end in ended)
    return row


def paired(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b)]


def ms(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}" if abs(value) < 1000 \
        else f"{value:.0f}"


def load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def environment(load_at_start: float | None) -> dict:
    import torch
    import transformers

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
        except Exception:
            return "?"

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "grpcio": grpc.__version__,
        "tether_commit": git("rev-parse", "--short", "HEAD"),
        "tether_uncommitted_changes": git("status", "--porcelain", "--", "runtime", "tether", "client", "server"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_1m_at_start_and_end": [load_at_start, load()],
    }


def busy_note(env: dict) -> list[str]:
    loads = [x for x in env["load_average_1m_at_start_and_end"] if x is not None]
    if loads and max(loads) > (os.cpu_count() or 1) - 0.5:
        return [f"The machine was busy (1-minute load average {loads} on {os.cpu_count()} CPUs): absolute times "
                "are inflated; the paired differences are the numbers to read."]
    return []


def log(name: str, text: str) -> None:
    print(f"[{name}] {text}", file=sys.stderr, flush=True)


# ---- timing --------------------------------------------------------------------------------------------


def interleaved(cases: dict[str, Callable[[], Any]], budget_s: float, min_reps: int, max_reps: int,
                warmup: int = 2, seed: int = 0) -> tuple[dict[str, list[float]], int]:
    """Repetitions of every case in a fresh random order each, for about `budget_s` seconds (clamped to
    [min_reps, max_reps]); per-case times in ms, in repetition order (so index i of two cases is a pair)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {key: [] for key in cases}
    gc.collect()
    rng = random.Random(seed)
    keys = list(cases)
    deadline = time.perf_counter() + budget_s
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() < deadline):
        rng.shuffle(keys)
        for key in keys:
            start = time.perf_counter_ns()
            cases[key]()
            times[key].append((time.perf_counter_ns() - start) / 1e6)
        reps += 1
    return times, reps


# ---- a bare gRPC server and clients: what a tether RPC is compared with ---------------------------------

_SERVICE = "benchbare.Bare"


class BareServer:
    """Generic-handler methods on raw bytes (no protobuf): Unary (echo), Bidi (echo each message) and
    Stream (the request is a decimal byte count; the answer is that many bytes in CHUNK-byte messages, each
    a slice of one buffer held by the server, so each message is one copy as tether's result chunks are)."""

    def __init__(self, payload_bytes: int = 0):
        self.payload = os.urandom(payload_bytes) if payload_bytes else b""
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
            "Stream": grpc.unary_stream_rpc_method_handler(self._stream),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="bare-rpc"),
                                  options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"

    @staticmethod
    def _bidi(requests, context):
        yield from requests

    def _stream(self, request, context):
        total = int(request)
        view = memoryview(self.payload)
        for offset in range(0, total, CHUNK):
            size = min(CHUNK, total - offset)
            yield bytes(view[offset:offset + size]) if offset + size <= len(view) else bytes(size)

    def stop(self) -> None:
        self.server.stop(0).wait()


class BareClient:
    """Sync Python gRPC on one channel: unary calls, bidi round trips, a byte stream."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 4 * CHUNK)])
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self._unary = self.channel.unary_unary(f"/{_SERVICE}/Unary")
        self._bidi = self.channel.stream_stream(f"/{_SERVICE}/Bidi")
        self._stream = self.channel.unary_stream(f"/{_SERVICE}/Stream")
        self._outbox: queue.SimpleQueue | None = None
        self._responses: Any = None

    def unary(self, payload: bytes = b"x" * 64) -> None:
        self._unary(payload)

    def bidi_open(self) -> None:
        self._outbox = queue.SimpleQueue()
        outbox = self._outbox

        def requests() -> Iterator[bytes]:
            while (message := outbox.get()) is not None:
                yield message

        self._responses = self._bidi(requests())

    def bidi(self, payload: bytes = b"x" * 64) -> None:
        """One round trip on the open bidi stream: write a message, read its echo."""
        self._outbox.put(payload)
        next(self._responses)

    def bidi_close(self) -> None:
        self._outbox.put(None)
        for _ in self._responses:
            pass

    def stream(self, total: int) -> int:
        buf = bytearray()
        for chunk in self._stream(str(total).encode()):
            buf += chunk
        return len(buf)

    def close(self) -> None:
        self.channel.close()


class BareAioClient:
    """grpc.aio on an asyncio loop run by its own thread, called from the caller's thread and waited for:
    the architecture of tether's client (client/channel.py), without tether."""

    def __init__(self, address: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bare-aio", daemon=True)
        self.thread.start()
        self.channel = self._call(self._open(address))
        self._unary = self.channel.unary_unary(f"/{_SERVICE}/Unary")
        self._bidi = self.channel.stream_stream(f"/{_SERVICE}/Bidi")
        self._call_obj: Any = None

    async def _open(self, address: str) -> Any:
        channel = grpc.aio.insecure_channel(address)
        await channel.channel_ready()
        return channel

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def unary(self, payload: bytes = b"x" * 64) -> None:
        async def call() -> Any:
            return await self._unary(payload)

        self._call(call())

    def bidi_open(self) -> None:
        async def open_() -> Any:
            return self._bidi()

        self._call_obj = self._call(open_())

    def bidi(self, payload: bytes = b"x" * 64) -> None:
        async def round_trip() -> Any:
            await self._call_obj.write(payload)
            return await self._call_obj.read()

        self._call(round_trip())

    def bidi_close(self) -> None:
        async def close() -> None:
            await self._call_obj.done_writing()
            while await self._call_obj.read() is not grpc.aio.EOF:
                pass

        self._call(close())

    def close(self) -> None:
        self._call(self.channel.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def bare_latencies(kinds: list[str], budget_s: float, min_n: int = 200) -> dict[str, list[float]]:
    """Per-call times (ms) of bare gRPC on loopback. kinds: "unary", "bidi" (sync Python gRPC, the issue's
    reference), "aio_unary", "aio_bidi" (grpc.aio driven from another thread, as tether's client does)."""
    server = BareServer()
    out: dict[str, list[float]] = {}
    try:
        for kind in kinds:
            client = (BareAioClient if kind.startswith("aio_") else BareClient)(server.address)
            op = kind.removeprefix("aio_")
            try:
                if op == "bidi":
                    client.bidi_open()
                fn = client.bidi if op == "bidi" else client.unary
                for _ in range(50):
                    fn()
                times = []
                deadline = time.perf_counter() + budget_s
                while len(times) < min_n or time.perf_counter() < deadline:
                    start = time.perf_counter_ns()
                    fn()
                    times.append((time.perf_counter_ns() - start) / 1e6)
                if op == "bidi":
                    client.bidi_close()
            finally:
                client.close()
            out[kind] = times
    finally:
        server.stop()
    return out


BARE_LABELS = {
    "unary": "bare Python gRPC unary call (sync stub, 64 B)",
    "bidi": "bare Python gRPC bidi round trip (sync stub, 64 B)",
    "aio_unary": "bare grpc.aio unary, called from another thread (tether's client design)",
    "aio_bidi": "bare grpc.aio bidi round trip, from another thread (tether's client design)",
}


# ---- CPU per thread, from /proc (no profiler) ----------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """native thread id -> (name, CPU seconds) for every thread of this process."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            cpu = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
            name = names.get(int(tid))
            if name is None:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = "C thread " + f.read().strip()
            out[int(tid)] = (name, cpu)
        except (OSError, ValueError, IndexError):
            continue
    return out


def thread_group(name: str) -> str:
    """Threads of one role share a group: "tether-rpc_12" -> "tether-rpc"."""
    name = re.sub(r"(_\d+|-\d+)+$", "", name)
    return re.sub(r"^Thread-\d+", "Thread-N", name)


SERVER_GROUPS = ("tether-rpc", "tether-runjob-reader", "tether-worker")
CLIENT_GROUPS = ("MainThread", "tether-grpc")


def side_of(group: str) -> str:
    if group.startswith(SERVER_GROUPS) or group.endswith("(_serve)"):
        return "server"
    if group.startswith(CLIENT_GROUPS) or group.endswith("(consume_request_iterator)"):
        return "client"
    return "gRPC core / other"


def processes_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes `pids` of this machine have used so far (gone ones: 0)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, ValueError, IndexError):
            continue
    return total


def cpu_by_thread(fn: Callable[[], Any], n: int) -> dict:
    """Run `fn` n times; CPU ms per call of each thread group (10 ms /proc ticks, so use n * call >> 10 ms)."""
    before = _thread_cpu()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    after = _thread_cpu()
    groups: dict[str, float] = {}
    for tid, (name, seconds) in after.items():
        delta = seconds - before.get(tid, (name, 0.0))[1]
        if delta > 0:
            group = thread_group(name)
            groups[group] = groups.get(group, 0.0) + delta
    rows = sorted(({"group": g, "side": side_of(g), "cpu_ms_per_call": s * 1e3 / n} for g, s in groups.items()),
                  key=lambda r: -r["cpu_ms_per_call"])
    return {"calls": n, "wall_ms_per_call": wall * 1e3 / n, "process_cpu_ms_per_call": cpu * 1e3 / n, "groups": rows}


def cpu_table(title: str, data: dict) -> dict:
    rows = [[r["group"], r["side"], ms(r["cpu_ms_per_call"])] for r in data["groups"] if r["cpu_ms_per_call"] >= 0.005]
    rows.append(["all threads (process CPU)", "", ms(data["process_cpu_ms_per_call"])])
    rows.append(["wall time", "", ms(data["wall_ms_per_call"])])
    return {"title": f"{title} ({data['calls']} calls; /proc per-thread CPU, no profiler)",
            "columns": ["thread group", "side", "CPU ms per call"], "rows": rows}


# ---- cProfile of every thread, in a child process ------------------------------------------------------


def profile_child(scenario: str, n: int, timeout_s: float = 240.0) -> dict:
    """Run bench/_profile_child.py's `scenario` n times in a fresh process (in-process server and client,
    every Python thread under cProfile with a per-thread CPU clock) and return its JSON summary."""
    proc = subprocess.run([sys.executable, "-m", "bench._profile_child", scenario, str(n)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"profile child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profile_tables(what: str, prof: dict, top: int = 14) -> list[dict]:
    unit = prof["unit"]
    tables = []
    for side in ("client", "server", "gRPC core / other"):
        data = prof["sides"].get(side)
        if not data:
            continue
        own = {
            "title": (f"profile, {side} side: {what}, own CPU per {unit} ({prof['n']} {unit}s under cProfile with a "
                      f"per-thread CPU clock; threads: {', '.join(data['threads'])}; total "
                      f"{ms(data['total_ms'])} ms per {unit})"),
            "columns": ["function", "calls", f"own CPU ms/{unit}", f"cumulative ms/{unit}"],
            "rows": [[r["where"], f"{r['calls']:.1f}", ms(r["own_ms"]), ms(r["cum_ms"])] for r in data["own"][:top]],
        }
        cum = {
            "title": f"profile, {side} side: {what}, tether's own functions by cumulative CPU per {unit}",
            "columns": ["function", "calls", f"own CPU ms/{unit}", f"cumulative ms/{unit}"],
            "rows": [[r["where"], f"{r['calls']:.1f}", ms(r["own_ms"]), ms(r["cum_ms"])]
                     for r in data["project_cum"][:top]],
        }
        tables += [own, cum]
    return tables


@contextmanager
def quiet_client() -> Iterator[None]:
    """No status line or remote log printing while benchmarking."""
    from tether import CONFIG

    saved = CONFIG.APP.DISPLAY, CONFIG.APP.REMOTE_LOGGING
    CONFIG.APP.DISPLAY, CONFIG.APP.REMOTE_LOGGING = False, False
    try:
        yield
    finally:
        CONFIG.APP.DISPLAY, CONFIG.APP.REMOTE_LOGGING = saved


@contextmanager
def host(address: str) -> Iterator[None]:
    """CONFIG.API.HOST = address for the block (LanguageModel("name") fetches its spec from there)."""
    from tether import CONFIG

    saved = CONFIG.API._host
    CONFIG.API.HOST = address
    try:
        yield
    finally:
        CONFIG.API._host = saved


# ---- wall time of named steps, without a profiler ------------------------------------------------------


def timed_steps(steps: list[tuple[str, str, str]], fn: Callable[[], Any], n: int) -> dict:
    """Run `fn` n times with each step timed by a wrapper: steps are (label, module, "name" or "Class.name").

    Each wrapper adds ~1 us per call; times are inclusive wall times (nested steps count in both), summed
    over every thread that ran the step. Steps whose module or attribute does not exist are left out.
    """
    import importlib

    totals: dict[str, list] = {}
    patched = []

    def wrap(label: str, original: Callable) -> Callable:
        row = totals[label] = [0, 0]

        def timed(*args, **kwargs):
            start = time.perf_counter_ns()
            try:
                return original(*args, **kwargs)
            finally:
                row[0] += 1
                row[1] += time.perf_counter_ns() - start

        return timed

    for label, module_name, attr in steps:
        try:
            owner: Any = importlib.import_module(module_name)
            *parents, name = attr.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            original = vars(owner)[name]
        except (ImportError, AttributeError, KeyError):
            continue
        if not callable(original):
            continue
        setattr(owner, name, wrap(label, original))
        patched.append((owner, name, original))
    try:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        wall = time.perf_counter() - start
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
    return {"calls": n, "wall_ms_per_call": wall * 1e3 / n,
            "steps": [{"label": label, "calls_per_call": c / n, "ms_per_call": t / 1e6 / n}
                      for label, (c, t) in totals.items()]}


def steps_table(title: str, data: dict, unit: str = "job") -> dict:
    rows = [[r["label"], f"{r['calls_per_call']:.2f}", ms(r["ms_per_call"])] for r in data["steps"]]
    rows.append([f"whole {unit}, wall", "1", ms(data["wall_ms_per_call"])])
    return {"title": f"{title} ({data['calls']} {unit}s, wrapped timers, no profiler; inclusive wall time)",
            "columns": ["step", f"calls/{unit}", f"ms/{unit}"], "rows": rows}
