"""Remote execution on loopback: what `remote=True` adds to a job, jobs/s under concurrency, result throughput
(issue 3, "Benchmark").

An in-process server (`tether.server.app.start_server`, 127.0.0.1, port 0) hosts a tiny GPT-2 (2 layers, width
64) and a GPT-2-small-shaped random one (12 layers, width 768, 12 heads; vocabulary 512); the client runs in
the same process, CPU, one torch thread. Measured side by side in one run:

1. latency: the same body (two saves) traced locally and remotely, interleaved repetitions in a fresh random
   order each; the added latency is the distribution of per-repetition (paired) differences, p50/p99. For the
   tiny model also against the same server in a child process (client and server then do not share a GIL).
2. jobs/s with 1, 8 and 32 concurrent clients: threads, each with its own `LanguageModel(name)`, running
   blocking remote traces until a time budget (and a job cap) is spent.
3. result throughput of one saved 256 MiB activation (`torch.randn(64, 1024, 1024)` made on the server),
   with tether.values' per-tensor lz4 decision (auto), lz4 forced on and forced off (in-process, by replacing
   `tether.tensor_codec.worth_compressing` for the case), and a compressible `torch.zeros` of the same size (auto);
   compared with a bare gRPC server stream of 1 MiB byte chunks measured in the same loop. The result path
   is the job minus the same job saving 16 bytes of the tensor instead (paired), so the server-side tensor
   creation cancels out.
4. for scale: bare Python gRPC unary calls and bidi round trips on loopback (sync stubs, and grpc.aio driven
   from another thread the way tether's client is).

Targets (issue 3): remote adds <= 3 ms p50 to a tiny-model job; result throughput >= 80% of the bare stream.
When the latency target is missed (or with `--profile`), the tiny remote job is broken down: CPU per thread
(/proc), wrapped timers around its steps, and cProfile of every thread of a fresh in-process server + client (in
a child process); when the throughput target is missed, the 256 MiB job is profiled the same way.

Run it with `python -m bench.run --only remote` or `python -m bench.remote [--quick] [--profile]`; `--part
throughput` runs section 3 (and its profile) alone, `--part jobs` the others.
"""

from __future__ import annotations

import functools
import gc
import subprocess
import sys
import threading
import time
from typing import Any

import torch

import tether.tensor_codec as tv
from tether import LanguageModel
from tether.client.channel import close_all
from tether.server.app import start_server
from tether.server.workers import Limits
from tether.tiny import gpt2_config_model, tiny_gpt2, train_tokenizer

from . import Options
from ._common import (
    BARE_LABELS,
    ROOT,
    BareClient,
    BareServer,
    bare_latencies,
    busy_note,
    concurrent_clients,
    cpu_by_thread,
    cpu_table,
    environment,
    host,
    interleaved,
    load,
    log,
    median,
    ms,
    paired,
    pct,
    profile_child,
    profile_tables,
    quiet_client,
    timed_steps,
)

__all__ = ["run", "main"]

NAME = "remote"
TITLE = "Remote execution on loopback: added latency, jobs/s, result throughput (in-process server, CPU)"
PROMPT = "The quick brown fox"
BIG_SHAPE = (64, 1024, 1024)  # float32: 256 MiB
BIG_BYTES = 4 * BIG_SHAPE[0] * BIG_SHAPE[1] * BIG_SHAPE[2]
CLIENTS = (1, 8, 32)
PARTS = ("jobs", "throughput")  # --part: jobs = sections 1, 2 and 4 (and their profile); throughput = section 3

# seconds at budget_scale 1
LATENCY_BUDGET_S = {"tiny": 10.0, "gpt2s": 10.0}
CONCURRENCY_BUDGET_S = {"tiny": 2.0, "gpt2s": 2.0}  # per client count
CONCURRENCY_JOB_CAP = 3000  # jobs per client count, shared by its clients
THROUGHPUT_BUDGET_S = 14.0
BARE_BUDGET_S = 1.5  # per kind
PROFILE_JOBS = 200
PROFILE_BIG_JOBS = 2

ADDED_TARGET_MS = 3.0
THROUGHPUT_TARGET = 0.8

# steps timed (wrapped) when profiling: (label, module, attribute)
STEPS = [
    ("client: build_job (the JobSpec of the captured body)", "tether.client.runner", "build_job"),
    ("client:   _Body.__init__ (AST walk of the body, in build_job)", "tether.client.encode", "_Body.__init__"),
    ("client: resolve_api_key (reads the user config file)", "tether.client.runner", "resolve_api_key"),
    ("client: _submit_and_wait (SubmitJob with wait, until the result is in)", "tether.client.runner",
     "_submit_and_wait"),
    ("client: JobEvents.feed (each event received)", "tether.client.events", "JobEvents.feed"),
    ("client: apply_result (decode the result, hand back)", "tether.client.runner", "apply_result"),
    ("server: JobService._start (decode the program, queue the job)", "tether.server.service", "JobService._start"),
    ("server:   decode_program", "tether.server.service", "decode_program"),
    ("server: Job.set_state (each publishes a status event)", "tether.server.jobs", "Job.set_state"),
    ("server: JobRun.run (the job on its worker)", "tether.server.worker_main", "JobRun.run"),
    ("server:   execute (runtime.program: the program, forward included)", "tether.server.worker_main", "execute"),
    ("server:     block_of (parse the received body)", "tether.runtime.program", "block_of"),
    ("server:     _context (model.trace(...): tokenize, build the tracer)", "tether.runtime.program", "_context"),
    ("both:       Block.code (deepcopy + compile of the body)", "tether.runtime.capture", "Block.code"),
    ("both:       GPT2LMHeadModel.forward (hooks and interventions included)",
     "transformers.models.gpt2.modeling_gpt2", "GPT2LMHeadModel.forward"),
    ("server:   encode_result", "tether.server.worker_main", "encode_result_pieces"),
    ("server:   Job.complete (store the result, publish its chunks)", "tether.server.jobs", "Job.complete"),
]

MODEL_LABELS = {"tiny": "tiny GPT-2 (2 x 64)", "gpt2s": "GPT-2-small shape (12 x 768)"}


# ---- the bodies: identical for the local and the remote model ------------------------------------------


def two_saves(lm, **remote):
    with lm.trace(PROMPT, **remote):
        hidden = lm.transformer.h[0].output[0].save()
        logits = lm.lm_head.output.save()
    return hidden, logits


def save_randn(lm):
    with lm.trace(PROMPT, remote=True):
        big = torch.randn(*BIG_SHAPE).save()
    return big


def save_randn_bit(lm):  # the same job, saving 16 bytes of the tensor: the baseline of the result path
    with lm.trace(PROMPT, remote=True):
        big = torch.randn(*BIG_SHAPE)
        bit = big[0, 0, :4].save()
    return bit


def save_zeros(lm):
    with lm.trace(PROMPT, remote=True):
        big = torch.zeros(*BIG_SHAPE).save()
    return big


def save_zeros_bit(lm):
    with lm.trace(PROMPT, remote=True):
        big = torch.zeros(*BIG_SHAPE)
        bit = big[0, 0, :4].save()
    return bit


# ---- set-up --------------------------------------------------------------------------------------------


def _models() -> dict[str, tuple[Any, Any]]:
    tokenizer = train_tokenizer(512)
    return {
        "tiny": tiny_gpt2(),
        "gpt2s": (gpt2_config_model(12, 768, 12, vocab_size=len(tokenizer)), tokenizer),
    }


class _ChildServer:
    """The tiny model served by bench/_serve_child.py in another process."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench._serve_child"], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.address: str | None = None

    def wait(self, timeout: float = 120.0) -> str:
        if self.address is None:
            line = [None]
            reader = threading.Thread(target=lambda: line.__setitem__(0, self.proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(timeout)
            if not line[0]:
                raise RuntimeError("bench._serve_child did not report its address")
            self.address = line[0].strip()
        return self.address

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(15)
        except Exception:
            self.proc.kill()


# ---- 1. latency ----------------------------------------------------------------------------------------


def _latency(name: str, local_lm, remote_lm, child_lm, child_address: str | None, budget_s: float) -> dict:
    cases = {"local": lambda: two_saves(local_lm), "remote": lambda: two_saves(remote_lm, remote=True)}
    if child_lm is not None:
        cases["remote_child"] = lambda: two_saves(child_lm, remote=True, backend=child_address)
    # the remote results are exactly the local ones
    want = two_saves(local_lm)
    for key in [k for k in cases if k != "local"]:
        got = cases[key]()
        if not all(torch.equal(a, b) for a, b in zip(want, got)):
            raise AssertionError(f"{name}: the {key} job's saves differ from the local trace's")
    t0 = time.perf_counter()
    times, reps = interleaved(cases, budget_s, min_reps=20, max_reps=5000, warmup=5)
    log(NAME, f"{name} latency: {reps} repetitions of {len(cases)} cases in {time.perf_counter() - t0:.1f} s")
    out = {"reps": reps, "cases": {}}
    for key, t in times.items():
        row = {"p50_ms": median(t), "p99_ms": pct(t, 99), "n": len(t)}
        if key != "local":
            d = paired(t, times["local"])
            row |= {"added_p50_ms": median(d), "added_p99_ms": pct(d, 99), "added_p90_ms": pct(d, 90)}
        out["cases"][key] = row
    return out


# ---- 2. concurrency ------------------------------------------------------------------------------------


def _concurrency(name: str, make_model, budget_s: float) -> dict:
    out = {}
    for n in CLIENTS:
        out[str(n)] = _clients(n, [make_model() for _ in range(n)], budget_s)
        log(NAME, f"{name}: {n} clients, {out[str(n)]['jobs']} jobs in {out[str(n)]['seconds']:.1f} s")
    return out


def _clients(n: int, models: list, budget_s: float) -> dict:
    """n threads, each running blocking remote jobs on its own model until the budget (or its cap) is spent."""
    return concurrent_clients(n, lambda i, k: two_saves(models[i], remote=True), budget_s,
                              cap=max(3, CONCURRENCY_JOB_CAP // n))


# ---- 3. result throughput ------------------------------------------------------------------------------


class _Recorder:
    """Wraps tether.values' tensor encoder/decoder to record what happened to tensors >= 1 MiB, and can force
    the lz4 decision (in-process: the server's encoder is this module's)."""

    def __init__(self):
        self.events: list[dict] = []
        self._parts, self._from, self._worth = tv.tensor_parts, tv.tensor_from, tv.worth_compressing
        self.force: bool | None = None

    def __enter__(self):
        parts, from_, worth = self._parts, self._from, self._worth

        def tensor_parts(t, compress):
            start = time.perf_counter()
            head, data = parts(t, compress)
            raw = t.numel() * t.element_size()
            if raw >= 1 << 20:
                self.events.append({"op": "encode", "raw": raw, "wire": len(data), "s": time.perf_counter() - start,
                                    "lz4": head.compression == tv.values_pb2.COMPRESSION_LZ4})
            return head, data

        def tensor_from(data_type, shape, compression, data, requires_grad=False):
            start = time.perf_counter()
            out = from_(data_type, shape, compression, data, requires_grad)
            if out.numel() * out.element_size() >= 1 << 20:
                self.events.append({"op": "decode", "s": time.perf_counter() - start})
            return out

        def worth_compressing(raw):
            return worth(raw) if self.force is None else self.force

        tv.tensor_parts, tv.tensor_from, tv.worth_compressing = tensor_parts, tensor_from, worth_compressing
        return self

    def __exit__(self, *exc):
        tv.tensor_parts, tv.tensor_from, tv.worth_compressing = self._parts, self._from, self._worth


def _throughput(model_and_tokenizer, budget_s: float) -> dict:
    limit = max(Limits().max_result_bytes, 2 * BIG_BYTES)
    server = start_server({"tiny": model_and_tokenizer}, queue_size=8, result_ttl=0.5, max_result_bytes=limit)
    bare_server = BareServer(payload_bytes=BIG_BYTES)
    bare = BareClient(bare_server.address)
    recorder = _Recorder()
    phases: dict[str, list[dict]] = {}
    try:
        with host(server.address), recorder:
            rllm = LanguageModel("tiny")

            def job(fn, force):
                def case():
                    recorder.force = force
                    mark = len(recorder.events)
                    out = fn(rllm)
                    recorder.force = None
                    phases.setdefault(key_of[case], []).append(recorder.events[mark:])
                    del out
                return case

            def bare_case():
                assert bare.stream(BIG_BYTES) == BIG_BYTES

            cases = {
                "bare": bare_case,
                "randn_auto": job(save_randn, None),
                "randn_lz4": job(save_randn, True),
                "randn_off": job(save_randn, False),
                "randn_base": job(save_randn_bit, None),
                "zeros_auto": job(save_zeros, None),
                "zeros_base": job(save_zeros_bit, None),
            }
            key_of = {fn: key for key, fn in cases.items()}
            t0 = time.perf_counter()
            times, reps = interleaved(cases, budget_s, min_reps=2 if budget_s >= 5 else 1, max_reps=20, warmup=1)
            log(NAME, f"throughput: {reps} repetitions of {len(cases)} cases in {time.perf_counter() - t0:.1f} s")
    finally:
        bare.close()
        bare_server.stop()
        close_all()
        server.stop(grace=0)
    gc.collect()
    bare_mbps = BIG_BYTES / 1e6 / (median(times["bare"]) / 1e3)
    out = {"reps": reps, "bytes": BIG_BYTES, "bare_mb_s": bare_mbps, "bare_ms": median(times["bare"]), "cases": {}}
    for key in ("randn_auto", "randn_lz4", "randn_off", "zeros_auto"):
        base = "zeros_base" if key.startswith("zeros") else "randn_base"
        path_ms = median(paired(times[key], times[base]))
        events = [e for run in phases.get(key, [])[1:] for e in run]  # the first run was the warm-up
        enc = [e for e in events if e["op"] == "encode" and e["raw"] == BIG_BYTES]
        dec = [e for e in events if e["op"] == "decode"]
        out["cases"][key] = {
            "job_ms": median(times[key]), "baseline_ms": median(times[base]), "result_path_ms": path_ms,
            "end_to_end_mb_s": BIG_BYTES / 1e6 / (median(times[key]) / 1e3),
            "result_path_mb_s": BIG_BYTES / 1e6 / (path_ms / 1e3),
            "of_bare": (BIG_BYTES / path_ms) / (BIG_BYTES / median(times["bare"])),
            "lz4_used": sorted({e["lz4"] for e in enc}),
            "wire_bytes": median([e["wire"] for e in enc]) if enc else float("nan"),
            "encode_ms": median([e["s"] * 1e3 for e in enc]) if enc else float("nan"),
            "decode_ms": median([e["s"] * 1e3 for e in dec]) if dec else float("nan"),
        }
    return out


# ---- the run -------------------------------------------------------------------------------------------


def run(options: Options | None = None) -> dict:
    options = options or Options()
    scale = options.budget_scale
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    started = time.perf_counter()
    load_at_start = load()
    notes: list[str] = []
    parts = set(options.parts) or set(PARTS)
    if parts - set(PARTS):
        raise ValueError(f"remote has no part {', '.join(sorted(parts - set(PARTS)))}; its parts: {', '.join(PARTS)}")
    data: dict[str, Any] = {}
    with quiet_client():
        if "jobs" in parts:
            child = _ChildServer()  # starts while the models are built
            log(NAME, "building the models and starting the server ...")
            _jobs(data, child, options, notes)  # no torch.no_grad(): the server runs jobs with autograd on
            gc.collect()
        if "throughput" in parts:
            log(NAME, "result throughput (256 MiB) ...")
            with torch.no_grad():
                data["throughput"] = _throughput(tiny_gpt2(), THROUGHPUT_BUDGET_S * scale)
            missed = data["throughput"]["cases"]["randn_auto"]["of_bare"] < THROUGHPUT_TARGET
            if options.profile or (missed and scale >= 0.5):  # not in a --quick smoke run unless asked
                log(NAME, "profiling the 256 MiB result job ...")
                try:
                    data["profile_big"] = profile_child("big_result", PROFILE_BIG_JOBS)
                except Exception as error:
                    notes.append(f"The cProfile child (256 MiB result) failed: {error}")
    env = environment(load_at_start)
    return {
        "name": NAME,
        "title": TITLE,
        "environment": env,
        "settings": {"prompt": PROMPT, "clients": list(CLIENTS), "big_shape": list(BIG_SHAPE),
                     "budget_scale": scale, "parts": sorted(parts), "threads": 1, "server": "in-process, 127.0.0.1, replicas=1",
                     "no_grad": False},
        "tables": _tables(data),
        "targets": _targets(data),
        "notes": notes + busy_note(env) + _method_notes(data),
        "data": data,
        "seconds": time.perf_counter() - started,
    }


def _jobs(data: dict, child: _ChildServer, options: Options, notes: list[str]) -> None:
    """Sections 1, 2 and 4, and the profile: one server with both models, and the child-process server."""
    scale = options.budget_scale
    served = _models()
    local_lm = {name: LanguageModel(m, tokenizer=t) for name, (m, t) in _models().items()}
    server = start_server(served, queue_size=64, result_ttl=5.0)
    try:
        with host(server.address):
            remote_lm = {name: LanguageModel(name) for name in served}
        try:
            child_address = child.wait()
            with host(child_address):
                child_lm = LanguageModel("tiny")
        except Exception as error:  # report without it
            child_address, child_lm = None, None
            notes.append(f"The child-process server did not start ({error}); its row is missing.")
        with host(server.address):
            data["latency"] = {
                name: _latency(name, local_lm[name], remote_lm[name], child_lm if name == "tiny" else None,
                               child_address, LATENCY_BUDGET_S[name] * scale)
                for name in served
            }
            data["concurrency"] = {
                name: _concurrency(name, functools.partial(LanguageModel, name), CONCURRENCY_BUDGET_S[name] * scale)
                for name in served
            }
            data["local_jobs_per_s"] = {
                name: 1e3 / data["latency"][name]["cases"]["local"]["p50_ms"] for name in served
            }
            data["bare"] = {k: {"p50_ms": median(v), "p99_ms": pct(v, 99), "n": len(v)}
                            for k, v in bare_latencies(["unary", "bidi", "aio_unary", "aio_bidi"],
                                                       BARE_BUDGET_S * scale).items()}
            added = data["latency"]["tiny"]["cases"]["remote"]["added_p50_ms"]
            if options.profile or added > ADDED_TARGET_MS:
                log(NAME, "profiling the tiny remote job ...")
                n = max(30, int(PROFILE_JOBS * min(1.0, scale * 3)))
                remote_job = functools.partial(two_saves, remote_lm["tiny"], remote=True)
                local_job = functools.partial(two_saves, local_lm["tiny"])
                data["cpu_remote"] = cpu_by_thread(remote_job, n)
                data["cpu_local"] = cpu_by_thread(local_job, n)
                data["steps_remote"] = timed_steps(STEPS, remote_job, n)
                data["steps_local"] = timed_steps(STEPS, local_job, n)
                try:
                    data["profile"] = profile_child("job", n)
                except Exception as error:
                    notes.append(f"The cProfile child failed: {error}")
    finally:
        close_all()
        server.stop(grace=0)
        child.stop()


# ---- report --------------------------------------------------------------------------------------------


def _tables(d: dict) -> list[dict]:
    tables = _job_tables(d) if "latency" in d else []
    if "throughput" in d:
        tables.append(_throughput_table(d["throughput"]))
    if "bare" in d:
        tables.append({
            "title": "4. for scale: bare gRPC on loopback (64-byte messages)",
            "columns": ["call", "p50 ms", "p99 ms", "n"],
            "rows": [[BARE_LABELS[k], ms(v["p50_ms"]), ms(v["p99_ms"]), str(v["n"])] for k, v in d["bare"].items()],
        })
    return tables + _profile_tables(d)


def _job_tables(d: dict) -> list[dict]:
    """Sections 1 and 2."""
    labels = {"local": "local trace", "remote": "remote, in-process server",
              "remote_child": "remote, server in a child process"}
    rows = []
    for name, lat in d["latency"].items():
        for key, c in lat["cases"].items():
            rows.append([MODEL_LABELS[name], labels[key], ms(c["p50_ms"]), ms(c["p99_ms"]),
                         ms(c["added_p50_ms"]) if "added_p50_ms" in c else "-",
                         ms(c["added_p99_ms"]) if "added_p99_ms" in c else "-", str(c["n"])])
    tables = [{
        "title": "1. one job, two saves (h[0].output[0], lm_head.output): local vs remote, interleaved repetitions",
        "columns": ["model", "case", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "n"],
        "rows": rows,
    }]
    rows = []
    for name, conc in d["concurrency"].items():
        rows.append([MODEL_LABELS[name], "local trace, 1 thread (for scale)", f"{d['local_jobs_per_s'][name]:.1f}",
                     ms(d["latency"][name]["cases"]["local"]["p50_ms"]), "", "", ""])
        for n, c in conc.items():
            rows.append([MODEL_LABELS[name], f"{n} client{'s' if c['clients'] > 1 else ''}", f"{c['jobs_per_s']:.1f}",
                         ms(c["p50_ms"]), ms(c["p99_ms"]), str(c["jobs"]), f"{c['seconds']:.1f}"])
    tables.append({
        "title": "2. remote jobs/s with concurrent clients (threads, each its own LanguageModel; blocking traces)",
        "columns": ["model", "clients", "jobs/s", "latency p50 ms", "p99 ms", "jobs", "seconds"],
        "rows": rows,
    })
    return tables


def _throughput_table(tp: dict) -> dict:
    labels = {"randn_auto": "torch.randn, lz4 auto (default)", "randn_lz4": "torch.randn, lz4 forced on",
              "randn_off": "torch.randn, lz4 forced off", "zeros_auto": "torch.zeros, lz4 auto (default)"}
    rows = [["bare gRPC stream, 1 MiB byte chunks", "-", ms(BIG_BYTES / 2**20), "-", "-", ms(tp["bare_ms"]), "-",
             f"{tp['bare_mb_s']:.0f}", "-", "100%"]]
    for key, c in tp["cases"].items():
        lz4 = {(True,): "lz4", (False,): "none", (): "?"}.get(tuple(c["lz4_used"]), "mixed")
        rows.append([labels[key], lz4, ms(c["wire_bytes"] / 2**20), ms(c["encode_ms"]), ms(c["decode_ms"]),
                     ms(c["job_ms"]),
                     ms(c["result_path_ms"]), f"{c['result_path_mb_s']:.0f}", f"{c['end_to_end_mb_s']:.0f}",
                     f"{100 * c['of_bare']:.0f}%"])
    return {
        "title": (f"3. result throughput, one saved 256 MiB float32 activation ({tp['reps']} interleaved repetitions; "
                  "MB = 1e6 bytes)"),
        "columns": ["case", "sent as", "wire MiB", "server encode ms", "client decode ms", "job ms",
                    "result path ms", "result MB/s", "end-to-end MB/s", "of bare"],
        "rows": rows,
    }


def _profile_tables(d: dict) -> list[dict]:
    tables = []
    if "cpu_remote" in d:
        tables.append(cpu_table("CPU per job by thread: tiny remote job (client and server in this process)",
                                d["cpu_remote"]))
        tables.append(cpu_table("CPU per job by thread: the same body traced locally", d["cpu_local"]))
    if "steps_remote" in d:
        local = {r["label"]: r for r in d["steps_local"]["steps"]}
        rows = [[r["label"], f"{r['calls_per_call']:.1f}", ms(r["ms_per_call"]),
                 ms(local[r["label"]]["ms_per_call"]) if local.get(r["label"], {}).get("calls_per_call") else "-"]
                for r in d["steps_remote"]["steps"] if r["calls_per_call"]]
        rows.append(["whole job, wall", "1", ms(d["steps_remote"]["wall_ms_per_call"]),
                     ms(d["steps_local"]["wall_ms_per_call"])])
        tables.append({"title": (f"steps of the tiny job ({d['steps_remote']['calls']} jobs each way; wrapped timers, "
                                 "no profiler; inclusive wall ms per job, nested steps indented)"),
                       "columns": ["step", "calls/job", "remote ms/job", "local trace ms/job"], "rows": rows})
    if "profile" in d:
        tables += profile_tables("tiny remote job, two saves", d["profile"])
    if "profile_big" in d:
        tables += profile_tables("one 256 MiB torch.randn saved on the server (lz4 auto)", d["profile_big"], top=12)
    return tables


def _targets(d: dict) -> list[dict]:
    return (_job_targets(d) if "latency" in d else []) + (_throughput_targets(d["throughput"]) if "throughput" in d
                                                           else [])


def _job_targets(d: dict) -> list[dict]:
    tiny = d["latency"]["tiny"]["cases"]["remote"]
    out = [{
        "key": "added_latency", "name": "remote adds to a tiny-model job, p50 (in-process server)",
        "value": tiny["added_p50_ms"], "limit": ADDED_TARGET_MS, "ok": tiny["added_p50_ms"] <= ADDED_TARGET_MS,
        "text": f"{ms(tiny['added_p50_ms'])} ms (p99 {ms(tiny['added_p99_ms'])} ms)",
    }]
    child = d["latency"]["tiny"]["cases"].get("remote_child")
    if child:
        out.append({"key": "added_latency_child", "name": "the same, server in a child process (info)",
                    "value": child["added_p50_ms"], "limit": None, "ok": None,
                    "text": f"{ms(child['added_p50_ms'])} ms (p99 {ms(child['added_p99_ms'])} ms)"})
    g = d["latency"]["gpt2s"]["cases"]["remote"]
    out.append({"key": "added_latency_768", "name": "remote adds to a 12 x 768 job, p50 (info)",
                "value": g["added_p50_ms"], "limit": None, "ok": None,
                "text": f"{ms(g['added_p50_ms'])} ms (p99 {ms(g['added_p99_ms'])} ms)"})
    return out


def _throughput_targets(tp: dict) -> list[dict]:
    auto = tp["cases"]["randn_auto"]
    out = [{
        "key": "throughput", "name": "256 MiB result throughput / bare gRPC stream (default lz4 decision)",
        "value": auto["of_bare"], "limit": THROUGHPUT_TARGET, "at_least": True,
        "ok": auto["of_bare"] >= THROUGHPUT_TARGET,
        "text": (f"{auto['result_path_mb_s']:.0f} / {tp['bare_mb_s']:.0f} MB/s = {100 * auto['of_bare']:.0f}% "
                 f"(target >= {100 * THROUGHPUT_TARGET:.0f}%)"),
    }]
    for key, label in (("randn_lz4", "lz4 forced on"), ("randn_off", "lz4 forced off")):
        c = tp["cases"][key]
        out.append({"key": f"throughput_{key}", "name": f"the same, {label} (info)", "value": c["of_bare"],
                    "limit": None, "ok": None,
                    "text": f"{c['result_path_mb_s']:.0f} MB/s = {100 * c['of_bare']:.0f}% of bare"})
    return out


def _method_notes(d: dict) -> list[str]:
    return [
        "Latency: interleaved repetitions (each runs every case once, in a fresh random order); 'added' = "
        "percentiles of per-repetition differences remote - local. Remote = a blocking `trace(..., remote=True)`: "
        "build the JobSpec, a SubmitJob that waits for the job's end (no local() blocks), queue, run on the server's worker, result events, decode, hand back.",
        "No torch.no_grad() anywhere: the server runs jobs with autograd on, so the local cases do too.",
        "The child-process row runs the same client against the same model served by `python -m "
        "bench._serve_child`: the in-process rows pay for client and server sharing one GIL on this machine.",
        "Concurrency: all clients start together at a barrier; each runs jobs until the time budget or its share "
        f"of {CONCURRENCY_JOB_CAP} jobs is spent; jobs/s = jobs / time until the last client finished. The server "
        "has one worker per model (replicas=1), so jobs run one at a time; queue_size raised to 64.",
        f"Throughput: max_result_bytes {max(Limits().max_result_bytes, 2 * BIG_BYTES) >> 20} MiB (the default, "
        f"{Limits().max_result_bytes >> 20} MiB, already fits 256 MiB), result_ttl 0.5 s so finished results are "
        "freed. 'result path' = job - the same job saving 16 bytes of the tensor (paired median): server encode, "
        "result events over gRPC, client assembly and decode. 'server encode' is tether.tensor_codec.tensor_parts "
        "(the lz4 decision and compression; the copy into the result follows it). Forced cases replace "
        "tether.tensor_codec.worth_compressing; 'True' still sends raw bytes when lz4 does not shrink them.",
        "The bare stream: a generic-handler unary-stream RPC answering 256 chunks of 1 MiB, each a `bytes` slice "
        "of one buffer (one copy per message, as tether's result chunks), read into one bytearray.",
    ]


def main(argv: list[str] | None = None) -> int:
    from .run import main as run_main

    return run_main(["--only", NAME, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
