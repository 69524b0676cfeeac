"""Issue 4: `local()` blocks of a remote job run on the client, mid-pass, and their values flow both ways.

Each behaviour is checked against the same code run locally (where the block is just code), on a real
loopback server. No test sleeps: threads hand over with Events, Barriers and Conditions with timeouts.
"""

from __future__ import annotations

import io
import socket
import threading
import time

import pytest
import torch

import tether
from tether import LanguageModel, NNsight, tiny
from tether.client import RemoteBackend
from tether.client.channel import close_all, connect
from tether.server.app import start_server
from tether.v1 import jobs_pb2, models_pb2

PROMPT = "The quick brown fox"
WAIT_S = 30.0  # longest any hand-over between threads may take


def served() -> dict:
    """"tiny" and an identical "tiny_b" (own queue and worker), so two clients' jobs run at the same time."""
    return {"tiny": tiny.tiny_gpt2(), "tiny_b": tiny.tiny_gpt2()}


pytestmark = pytest.mark.usefixtures("client_config")  # every test talks to this module's server


@tether.trace
def shout(text: str) -> str:
    return text.upper()


def scaled(t: torch.Tensor) -> torch.Tensor:
    """A user function the body calls (shipped as source): its own block binds what it reads after."""
    with tether.local():
        factor = float(t.abs().max()) + 1.0
    return t / factor


def test_a_local_block_in_a_shipped_function_hands_its_values_to_that_function(llm, rllm):
    with llm.trace(PROMPT):
        out = scaled(llm.transformer.h[0].mlp.output).save()
    with rllm.trace(PROMPT, remote=True):
        r_out = scaled(rllm.transformer.h[0].mlp.output).save()
    assert torch.equal(out, r_out)


def test_a_value_goes_through_a_local_block_and_back_into_the_model(llm, rllm):
    offset = torch.linspace(-1, 1, 64)  # a local tensor the block uses; never sent to the server
    with llm.trace(PROMPT):
        mlp = llm.transformer.h[0].mlp.output
        with tether.local():
            edited = mlp * 2 + offset
            note = f"edited {tuple(edited.shape)}"
        llm.transformer.h[0].mlp.output = edited
        logits = llm.lm_head.output.save()
    with rllm.trace(PROMPT, remote=True) as tracer:
        mlp = rllm.transformer.h[0].mlp.output
        with tracer.local():
            edited = mlp * 2 + offset
            r_note = f"edited {tuple(edited.shape)}"
        rllm.transformer.h[0].mlp.output = edited
        r_logits = rllm.lm_head.output.save()
    assert torch.equal(logits, r_logits) and r_logits.dtype == logits.dtype
    assert r_note == note and note.startswith("edited (1, ")
    with pytest.raises(tether.UnsavedValueError):
        edited.sum()  # unsaved, exactly as after the local run


def test_a_block_at_each_of_8_generation_steps_runs_in_order(llm, rllm):
    def run(model, **remote):
        seen, count = [], 0
        with model.generate(PROMPT, max_new_tokens=8, **remote) as tracer:
            tracer.all()
            token = model.lm_head.output[0, -1].argmax(dim=-1)
            with tracer.local():
                count += 1
                seen.append((count, int(token)))
            tokens = model.generator.output.save()
        return seen, count, tokens

    seen, count, tokens = run(llm)
    r_seen, r_count, r_tokens = run(rllm, remote=True)
    assert r_count == count == 8
    assert [c for c, _ in r_seen] == list(range(1, 9))  # in order, state kept across the job's blocks
    assert r_seen == seen
    assert torch.equal(tokens, r_tokens)
    assert [t for _, t in r_seen] == tokens[0, -8:].tolist()


def test_64_mib_down_and_up(rllm):
    n = 16 << 20  # float32 elements: 64 MiB
    with rllm.trace(PROMPT, remote=True) as tracer:
        big = torch.arange(n, dtype=torch.float32)  # made on the server
        with tracer.local():
            down_ok = torch.equal(big, torch.arange(n, dtype=torch.float32))
            back = big.flip(0) + 1  # made here, 64 MiB up
        total = back.sum().save()
        ends = back[[0, -1]].save()
    expected = torch.arange(n, dtype=torch.float32).flip(0) + 1
    assert down_ok
    assert torch.equal(total, expected.sum())
    assert ends.tolist() == [float(n), 1.0]


def test_an_exception_in_a_local_block_shows_the_users_traceback_and_fails_the_job(rllm, capsys):
    context = rllm.trace(PROMPT, remote=True)
    with pytest.raises(ZeroDivisionError):
        with context as tracer:
            width = rllm.lm_head.output.shape[-1]
            with tracer.local():
                print(width / 0)
            rllm.lm_head.output.save()
    err = capsys.readouterr().err
    assert __file__ in err and "print(width / 0)" in err and "ZeroDivisionError" in err
    job_id = context.job_id
    with pytest.raises(tether.RemoteError, match="raised on the client"):
        RemoteBackend(job_id=job_id).result(timeout=WAIT_S)
    with rllm.trace(PROMPT, remote=True):  # the server runs the next job
        ok = rllm.lm_head.output.save()
    assert ok.shape[-1] == 512


def test_two_clients_in_local_blocks_at_once_see_only_their_own_values(llm, rllm):
    prompts = {0: PROMPT, 1: "Hello world, hello"}
    both_inside = threading.Barrier(2, timeout=WAIT_S)
    results: dict[int, tuple] = {}

    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            run(i)
        except BaseException as error:
            errors.append(error)
            both_inside.abort()

    models = {0: rllm, 1: LanguageModel("tiny_b")}

    def run(i: int) -> None:
        mine, model = torch.full((2,), float(i)), models[i]
        with model.trace(prompts[i], remote=True) as tracer:
            head = model.lm_head.output[0, -1, :2]
            with tracer.local():
                both_inside.wait()  # both jobs are inside a local() block now
                seen_head = head.clone().save()  # .save() in a local block keeps it, as locally
                reply = mine + 10
            total = (head * 0 + reply).save()
        results[i] = (seen_head, total)

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not errors, errors
    assert sorted(results) == [0, 1]
    for i, prompt in prompts.items():
        with llm.trace(prompt):
            head = llm.lm_head.output[0, -1, :2].save()
        seen_head, total = results[i]
        assert torch.equal(seen_head, head)
        assert torch.equal(total, torch.full((2,), float(i) + 10))


class _Watcher(io.TextIOBase):
    """A stdout that sets `seen` once `marker` has been written."""

    def __init__(self, marker: str):
        self.marker, self.text, self.seen = marker, "", threading.Event()

    def write(self, s: str) -> int:
        self.text += s
        if self.marker in self.text:
            self.seen.set()
        return len(s)


def test_print_in_a_local_block_appears_before_the_job_ends(rllm, monkeypatch):
    watcher = _Watcher("streamed 64")
    monkeypatch.setattr("sys.stdout", watcher)
    release, done = threading.Event(), threading.Event()

    def job() -> None:
        with rllm.trace(PROMPT, remote=True) as tracer:
            hidden = rllm.transformer.h[0].mlp.output
            with tracer.local():
                print("streamed", hidden.shape[-1])
            rllm.lm_head.output.save()
            with tracer.local():
                released = release.wait(WAIT_S)  # the job cannot end before the test saw the print
        done.set()
        assert released

    thread = threading.Thread(target=job, name="printing-client")
    thread.start()
    try:
        assert watcher.seen.wait(WAIT_S), "the print did not arrive while the job was running"
        assert not done.is_set()
    finally:
        release.set()
        thread.join(WAIT_S)
    assert done.is_set()


def test_traced_functions_run_in_local_blocks_and_are_refused_outside(rllm):
    with rllm.trace(PROMPT, remote=True) as tracer:
        width = rllm.lm_head.output.shape[-1]
        with tracer.local():
            label = shout(f"width {width}")
            lock = threading.Lock()  # a client-only object: stays here, handed back as is
    assert label == "WIDTH 512"
    assert isinstance(lock, type(threading.Lock()))
    with pytest.raises(tether.RemoteError, match="local") as info:
        with rllm.trace(PROMPT, remote=True):
            shout("not here")
    assert info.value.code == "INVALID_ARGUMENT"


class _Relay:
    """A TCP relay in front of a server; `cut()` drops every connection at once, like a failed network."""

    def __init__(self, target: tuple[str, int]):
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []  # guarded by _lock
        self._cut = False  # guarded by _lock
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(self._target)
            with self._lock:
                if self._cut:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), name="relay-pump", daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in progress
            except OSError:
                pass
            self._listener.close()
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def _release_and_stop(release: threading.Event, threads: list[threading.Thread], handle) -> None:
    """A test's end: let go of the job held in its local() block, wait for the test's threads, stop its server
    and close the client's channels to it."""
    release.set()
    for t in threads:
        t.join(WAIT_S)
    handle.stop(grace=0)
    close_all()


def test_a_dropped_connection_fails_every_pending_call_at_once(x):
    """A job holds the only worker inside a local() block; two more wait behind it on WatchJob. When the
    network between client and server fails, all three calls fail together with the same clear error."""
    net = NNsight(tiny.tiny_net())
    handle = start_server({"net": tiny.tiny_net()}, host="127.0.0.1", port=0)
    relay = _Relay(("127.0.0.1", handle.port))
    entered, release = threading.Event(), threading.Event()
    errors: dict[str, BaseException] = {}
    failed_at: dict[str, float] = {}

    def holder() -> None:
        try:
            with net.trace(x, remote=True, model_name="net", backend=relay.address):
                net.layer1.output.save()
                with tether.local():
                    entered.set()
                    release.wait(WAIT_S)
        except Exception as error:
            errors["holder"] = error

    def waiter(name: str) -> None:
        backend = RemoteBackend(relay.address, blocking=False)
        with net.trace(x, remote=True, model_name="net", backend=backend):
            net.output.save()
        try:
            backend.result(timeout=WAIT_S)
        except Exception as error:
            errors[name], failed_at[name] = error, time.monotonic()

    conn = connect(relay.address)
    threads = [threading.Thread(target=holder, name="holder")]
    try:
        threads[0].start()
        assert entered.wait(WAIT_S)
        threads += [threading.Thread(target=waiter, args=(f"waiter-{i}",), name=f"waiter-{i}") for i in (1, 2)]
        for t in threads[1:]:
            t.start()
        assert conn.wait_pending(3, WAIT_S)  # the holder's RunJob and both WatchJobs are in flight
        cut_at = time.monotonic()
        relay.cut()
        for t in threads[1:]:
            t.join(WAIT_S)
    finally:
        _release_and_stop(release, threads, handle)
    assert sorted(errors) == ["holder", "waiter-1", "waiter-2"]
    for error in errors.values():
        assert isinstance(error, tether.RemoteError)
        assert "Lost" in str(error) and relay.address in str(error)
    assert max(failed_at.values()) - cut_at < WAIT_S / 2  # failed by the cut, not by waiting out their time


@pytest.mark.parametrize("ending", ["network cut", "server stopped"])
def test_a_lost_connection_fails_an_asyncio_jobs_pending_calls_at_once(x, ending):
    """asyncio jobs run on the same shared connection as blocking ones: while a blocking job holds the only
    worker, an awaited job and an awaited fetch wait behind it. When the network fails, all three fail
    together with the same clear error, long before their own deadlines; when the server stops, they fail
    as promptly (each with the lost connection, or with the job's cancellation if the server sent it first)."""
    import asyncio

    from tether.client import aio

    net = NNsight(tiny.tiny_net())
    handle = start_server({"net": tiny.tiny_net()}, host="127.0.0.1", port=0)
    relay = _Relay(("127.0.0.1", handle.port))
    address = relay.address if ending == "network cut" else handle.address
    entered, release = threading.Event(), threading.Event()
    errors: dict[str, BaseException] = {}
    failed_at: dict[str, float] = {}

    def holder() -> None:
        try:
            with net.trace(x, remote=True, model_name="net", backend=address):
                net.layer1.output.save()
                with tether.local():
                    entered.set()
                    release.wait(WAIT_S)
        except Exception as error:
            errors["holder"] = error

    async def waiting(name: str, awaitable) -> None:
        try:
            await awaitable
        except Exception as error:
            errors[name], failed_at[name] = error, time.monotonic()

    async def awaiting() -> None:
        awaited = aio.AsyncBackend(address)
        with net.trace(x, remote=True, model_name="net", backend=awaited):
            net.output.save()
        submitted = RemoteBackend(address, blocking=False)
        with net.trace(x, remote=True, model_name="net", backend=submitted):
            net.layer1.output.save()
        await asyncio.gather(waiting("awaited", awaited.run()),
                             waiting("fetched", aio.fetch(submitted, timeout=WAIT_S)))

    conn = connect(address)
    threads = [threading.Thread(target=holder, name="holder"),
               threading.Thread(target=lambda: asyncio.run(awaiting()), name="asyncio-caller")]
    try:
        threads[0].start()
        assert entered.wait(WAIT_S)
        threads[1].start()
        assert conn.wait_pending(3, WAIT_S)  # the holder's RunJob and the two asyncio jobs' WatchJobs
        stopped_at = time.monotonic()
        if ending == "network cut":
            relay.cut()
        else:
            handle.stop(grace=0)
        threads[1].join(WAIT_S)
    finally:
        release.set()
        for t in threads:
            t.join(WAIT_S)
        relay.cut()
        handle.stop(grace=0)
        close_all()
    assert sorted(errors) == ["awaited", "fetched", "holder"]
    for error in errors.values():
        assert isinstance(error, tether.RemoteError), error
        lost = "Lost" in str(error) and address in str(error)
        assert lost or (ending == "server stopped" and "shutting down" in str(error)), str(error)
    assert max(failed_at.values()) - stopped_at < WAIT_S / 2  # failed by the stop, not by their own time


def _holder_of_the_only_worker(net: NNsight, x, address: str) -> tuple[threading.Thread, threading.Event,
                                                                       threading.Event]:
    """A thread (not started) whose job holds a one-worker server's worker inside a local() block, so the
    jobs a test sends meanwhile wait in the queue; `entered` is set once it holds it, `release` lets it end."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with net.trace(x, remote=True, model_name="net", backend=address):
            net.layer1.output.save()
            with tether.local():
                entered.set()
                release.wait(WAIT_S)

    return threading.Thread(target=hold, name="holder"), entered, release


def test_cancelling_the_task_that_awaits_a_job_cancels_the_job(x):
    """What Ctrl-C does to a blocking job, cancelling the asyncio task does to an awaited one."""
    import asyncio

    from tether.client import aio

    net = NNsight(tiny.tiny_net())
    handle = start_server({"net": tiny.tiny_net()}, host="127.0.0.1", port=0)
    thread, entered, release = _holder_of_the_only_worker(net, x, handle.address)

    async def cancelled() -> str:
        awaited = aio.AsyncBackend(handle.address)
        with net.trace(x, remote=True, model_name="net", backend=awaited):
            net.output.save()
        task = asyncio.ensure_future(awaited.run())
        assert await asyncio.to_thread(connect(handle.address).wait_pending, 2, WAIT_S)  # it is followed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return awaited.job_id

    try:
        thread.start()
        assert entered.wait(WAIT_S)
        job_id = asyncio.run(cancelled())
        assert RemoteBackend(handle.address, job_id=job_id).status() == "CANCELLED"
    finally:
        _release_and_stop(release, [thread], handle)


def test_a_client_that_goes_away_mid_call_fails_its_job_and_frees_the_worker(x):
    net = NNsight(tiny.tiny_net())
    handle = start_server({"net": tiny.tiny_net()}, host="127.0.0.1", port=0)
    entered, release = threading.Event(), threading.Event()
    job_ids: list[str] = []
    errors: list[BaseException] = []

    def vanishing_client() -> None:
        try:
            with net.trace(x, remote=True, model_name="net", backend=handle.address) as tracer:
                net.layer1.output.save()
                with tracer.local():
                    job_ids.append(tracer.job_id)
                    entered.set()
                    release.wait(WAIT_S)
        except Exception as error:
            errors.append(error)

    thread = threading.Thread(target=vanishing_client, name="vanishing-client")
    try:
        thread.start()
        assert entered.wait(WAIT_S)
        close_all()  # the client's connection goes away while the server waits for the block's answer
        release.set()
        thread.join(WAIT_S)
        assert errors and isinstance(errors[0], tether.RemoteError)
        with pytest.raises(tether.RemoteError):
            RemoteBackend(handle.address, job_id=job_ids[0]).result(timeout=WAIT_S)  # the job ended in ERROR
        with net.trace(x, remote=True, model_name="net", backend=handle.address):
            out = net.output.save()  # and the worker runs the next job
        assert torch.equal(out, tiny.tiny_net()(x))
    finally:
        _release_and_stop(release, [thread], handle)


def test_an_awaited_job_runs_its_local_blocks_too(rllm):
    import asyncio

    from tether.client import aio

    backend = aio.AsyncBackend()
    with rllm.trace(PROMPT, remote=True, backend=backend) as tracer:
        width = rllm.lm_head.output.shape[-1]
        with tracer.local():
            doubled = width * 2
            kept_here = [width]
        out = (rllm.lm_head.output[0, -1, :1] * 0 + doubled).save()
    for pending in (out, kept_here):  # nothing ran yet: the names stand for the awaited values
        with pytest.raises(tether.TetherError, match="not available yet"):
            print(pending)
    values = asyncio.run(backend.run())
    assert values["out"].tolist() == [1024.0]
    assert values["doubled"] == 1024 and values["kept_here"] == [512]
    assert backend.job_id and backend.state == "COMPLETED"


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raising KeyboardInterrupt, as in an interactive session, for the test's length (a shell starts its
    background jobs with SIGINT ignored, and Python then leaves it so)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("to_thread", ["main", "another"])
def test_ctrl_c_while_a_blocking_job_with_local_blocks_waits_cancels_the_job(x, to_thread, ctrl_c_raises):
    """Ctrl-C while a blocking job with local() blocks waits on its RunJob stream raises KeyboardInterrupt
    and cancels the job on the server, even before the client heard its id; also when the OS hands the
    signal to another of the process's threads (a wait with no end would wake only once the job moved on:
    here 30 s later, when the holder lets go of the worker)."""
    import os
    import signal

    net = NNsight(tiny.tiny_net())
    handle = start_server({"net": tiny.tiny_net()}, host="127.0.0.1", port=0)
    holder, entered, release = _holder_of_the_only_worker(net, x, handle.address)

    sent: list[float] = []  # when the Ctrl-C was sent (time.monotonic())

    def interrupt() -> None:  # as soon as the job's stream is out (the server may not have the job yet)
        if connect(handle.address).wait_pending(2, WAIT_S):
            sent.append(time.monotonic())
            if to_thread == "main":
                os.kill(os.getpid(), signal.SIGINT)  # (a real signal, as Ctrl-C sends; the OS picks the thread)
            else:
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    threads = [holder, threading.Thread(target=interrupt, name="ctrl-c")]
    try:
        threads[0].start()
        assert entered.wait(WAIT_S)
        holding = {job.id for job in handle.hub.store.jobs()}
        threads[1].start()
        started = time.monotonic()
        try:
            with net.trace(x, remote=True, model_name="net", backend=handle.address):
                hidden = net.layer1.output
                with tether.local():
                    hidden = hidden + 1
                net.output.save()
        except KeyboardInterrupt:
            assert sent and time.monotonic() - sent[0] < WAIT_S / 3, "the Ctrl-C reached the caller late"
        else:
            pytest.fail("the job ran to its end: " + (f"the Ctrl-C sent {sent[0] - started:.2f} s in was lost" if sent
                        else f"its stream was never seen pending on the connection within {WAIT_S:g} s"))
        interrupted = [job for job in handle.hub.store.jobs() if job.id not in holding]
        assert len(interrupted) <= 1  # (none: the server never had it)
        for job in interrupted:  # (while the holder still holds the worker: it never ran)
            assert job.wait_done(WAIT_S) == jobs_pb2.JOB_STATE_CANCELLED, job.status
    finally:
        _release_and_stop(release, threads, handle)


def _assert_no_thread_left_since(before: set[int]) -> None:
    """Every thread started since `before` (their idents) ends, within WAIT_S (threads end on their own: wait
    for that condition, bounded)."""
    deadline = time.monotonic() + WAIT_S
    while (left := [t.name for t in threading.enumerate() if t.ident not in before]) and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert not left, f"threads left running: {left}"


def test_a_blocking_callers_job_streams_leave_no_thread_behind(llm, rllm):
    """A blocking caller's RunJob (and the WatchJob of a non-blocking job) run on the blocking channel with a
    reader thread each, and gRPC's request thread for RunJob: all of them end with their calls."""
    def job(model, **remote):
        with model.trace(PROMPT, **remote) as tracer:
            hidden = model.transformer.h[0].output
            for _ in range(3):
                with tracer.local():
                    hidden = hidden + 1
            out = hidden.save()
        return out

    expected = job(llm)
    assert torch.equal(job(rllm, remote=True), expected)  # (the channels and their threads are up now)
    before = {t.ident for t in threading.enumerate()}
    for _ in range(5):
        assert torch.equal(job(rllm, remote=True), expected)
    with rllm.trace(PROMPT, remote=True, blocking=False) as tracer:
        late = rllm.lm_head.output.save()  # noqa: F841 (filled by result())
    assert tracer.backend.result()["late"].dim() == 3  # waits on a WatchJob stream
    _assert_no_thread_left_since(before)


def test_cancelling_a_blocking_stream_from_another_thread_ends_its_reader_with_the_reason(server):
    from tether.client.blocking_stream import BlockingStream, Cancelled
    from tether.client.channel import auth_metadata

    conn = connect(server.address)
    conn.unary(conn.models.ListModels, models_pb2.ListModelsRequest(), auth_metadata(None))
    deadline = time.monotonic() + WAIT_S
    while not conn._ready and time.monotonic() < deadline:  # (connected: the blocking twin is used from now on)
        threading.Event().wait(0.01)
    job_id = "no-such-job"
    call = conn.stream(conn.jobs.WatchJob, jobs_pb2.WatchJobRequest(job_id=job_id))
    assert isinstance(call, BlockingStream)
    with pytest.raises(Exception) as raised:
        call.next()  # the server refuses it (an unknown job): the reader hands the error over and ends
    assert not isinstance(raised.value, Cancelled)
    before = {t.ident for t in threading.enumerate()}
    call = conn.stream(conn.jobs.RunJob, first=None)  # a RunJob that sends nothing: the server waits for it
    canceller = threading.Thread(target=call.cancel, args=("stopped by the test",), daemon=True)
    canceller.start()
    with pytest.raises(Cancelled, match="stopped by the test"):
        call.next()
    assert call.finished
    canceller.join(WAIT_S)
    _assert_no_thread_left_since(before)  # the reader, and gRPC's request thread waiting for a message, end
