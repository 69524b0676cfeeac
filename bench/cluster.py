"""Replicas on a Ray cluster (`tether serve --ray`, issue 13): jobs/s with 1 and 2 replicas, the latency Ray
adds to a job over the embedded server (local worker processes), and a local() round trip through Ray.

A Ray head on 127.0.0.1 (5 logical CPUs, no dashboard) is started by this benchmark and stopped after; three
in-process servers: embedded (worker processes) hosting the tiny GPT-2; a front door of the Ray cluster
hosting the tiny GPT-2 (1 replica), `wide1` (a wider random GPT-2 whose forward pass dominates a job, 1 replica)
and `wide2` (the same model, 2 replicas); and a front door in another namespace without lanes (Ray actor calls
carry every message, as where no lane can be opened) hosting the tiny GPT-2. Each actor asks Ray for 1 CPU, so Ray sets its torch threads to 1;
the client runs in this process, one torch thread. Both servers run every job alone (max_batch 1): the
throughput compares replicas, not cross-job batching, and the latency pairs compare the same path.

1. latency: the same job (one save, tiny model) on the embedded server and on Ray (with and without lanes),
   interleaved in a fresh random order each repetition; what Ray adds is the distribution of per-repetition
   (paired) differences.
2. local() round trip, measured as bench/local_blocks.py measures it (so the figures mean the same thing): a
   remote trace runs BLOCKS `with tracer.local():` blocks in a loop, each carrying a 4-float tensor each way
   and appending `time.perf_counter()` on the client; consecutive stamps are one full round trip each (the
   answer up, the server resumes, the next call down, the block runs). Through Ray (with and without lanes)
   and the embedded server, interleaved; p50 over every block of the warm jobs.
   The row "old method" is what this benchmark reported before: a job with one block (the first layer's
   output down, `* 1` on the client, back, and swapped in) minus the same job without, paired. It is kept for
   one run beside the new rows to show why it was replaced: a job without a local() block is one SubmitJob
   call, a job with one opens a RunJob stream, so that difference held the stream's cost per job (1.2-1.4 ms
   here: a job with one 4-float block minus the job without, less one block's round trip), the 2 KB value's
   (0.1-0.3 ms) and the swap's (0.4 ms), and came out at 2.5-2.8 times bench/local_blocks.py's round trip on
   the same embedded server.
   Then the CPU per round trip of each process (the core and the replica's actor, the embedded server's
   worker process, and this one: the client and the front doors), from /proc: CPU_BLOCKS-block jobs less as
   many of the same jobs without blocks, per block (CPU hardly moves with the machine's load; wall time does).
3. jobs/s: CLIENTS client threads running blocking remote traces on `wide1` and on `wide2`, in alternating
   windows (ROUNDS of each, in a fresh random order per round, so a change of the machine's load hits both);
   the second replica only helps on a machine with a core to spare for it.

Run it with `python -m bench.run --only cluster` or `python -m bench.cluster [--quick]`.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the head stays on loopback

import torch

from tether import LanguageModel
from tether.client import Admin
from tether.client.channel import close_all
from tether.server.app import start_server
from tether.tiny import tiny_gpt2

from . import Options
from ._common import (
    busy_note,
    concurrent_clients,
    environment,
    interleaved,
    load,
    log,
    median,
    ms,
    paired,
    pct,
    processes_cpu,
    quiet_client,
)
from .local_blocks import blocks_job, no_blocks_job

NAME = "cluster"
TITLE = "Replicas as Ray actors: jobs/s, latency over the embedded server, local() through Ray"
PROMPT = "The Eiffel Tower is in the city of"
LATENCY_BUDGET_S = 20.0
ROUND_TRIP_BUDGET_S = 16.0
BLOCKS = 20  # local() blocks per job of the round-trip measurement
WARMUP = 2  # jobs of each server whose block intervals are left out
CPU_JOBS = 20  # jobs of CPU_BLOCKS blocks (and as many without) per server for the CPU account, at scale 1
CPU_BLOCKS = 50
TARGET_MS = 2.0  # issue 13: what Ray adds to a job, and a local() round trip through Ray, p50
THROUGHPUT_BUDGET_S = 20.0  # both models together
ROUNDS = 5  # throughput windows per model
CLIENTS = 4
NO_LANES = "bench-no-lanes"  # the namespace of the door whose messages all go by Ray calls
WIDE = {"n_layer": 12, "n_embd": 384, "n_head": 8}  # one forward of PROMPT: ~25 ms of CPU on one thread here


def wide_gpt2() -> tuple:
    """The forward-dominated model of the throughput runs (random weights from a config; `tether deploy`
    loads it as `bench.cluster:wide_gpt2`)."""
    return tiny_gpt2(**WIDE)


def _job(model: LanguageModel) -> None:
    with model.trace(PROMPT, remote=True):
        model.lm_head.output.save()


def _block_job(model: LanguageModel) -> None:
    with model.trace(PROMPT, remote=True) as tracer:
        hidden = model.transformer.h[0].output
        with tracer.local():
            hidden = hidden * 1
        model.transformer.h[0].output = hidden
        model.lm_head.output.save()


def _forward_ms() -> float:
    """The CPU time of one forward pass of the wide model on PROMPT in this process, one torch thread (median of
    9; CPU, not wall time, which other work on a busy machine inflates)."""
    model, tokenizer = wide_gpt2()
    ids = tokenizer(PROMPT, return_tensors="pt")
    times = []
    with torch.no_grad():
        for _ in range(11):
            started = time.thread_time()
            model(**ids)
            times.append((time.thread_time() - started) * 1e3)
    return median(times[2:])


def _round_trips(models: dict[str, LanguageModel], budget: float) -> dict[str, dict[str, Any]]:
    """Each server's local() round trip as bench/local_blocks.py measures it: the client's stamps of consecutive
    blocks of a BLOCKS-block job, the servers interleaved; the warm-up jobs' intervals left out."""
    intervals: dict[str, list[float]] = {name: [] for name in models}

    def stamped(name: str) -> None:
        stamps: list[float] = []
        blocks_job(models[name], BLOCKS, stamps)
        intervals[name].extend((b - a) * 1e3 for a, b in zip(stamps, stamps[1:]))

    _, reps = interleaved({name: lambda name=name: stamped(name) for name in models}, budget, min_reps=3,
                          max_reps=1 << 30, warmup=WARMUP, seed=random.randrange(1 << 30))
    out = {}
    for name, values in intervals.items():
        warm = values[WARMUP * (BLOCKS - 1):]
        out[name] = {"p50_ms": median(warm), "p90_ms": pct(warm, 90), "n": len(warm), "jobs": reps}
    return out


def _cluster_pids(server: Any, namespace: str) -> dict[str, list[int]]:
    """The pids of a cluster's core and of its `tiny` replica's actor (both on this machine)."""
    import ray

    from tether.server.cluster import CORE_NAME

    core = ray.get_actor(CORE_NAME, namespace=namespace)
    return {"core": [ray.get(core.__ray_call__.remote(lambda _: os.getpid()))],
            "actor": [server.hub.queues["tiny"].replicas[0].worker_pid(60)]}


def _round_trip_cpu(models: dict[str, LanguageModel], pids: dict[str, dict[str, list[int]]],
                    jobs: int) -> dict[str, dict[str, float]]:
    """CPU per local() round trip of each server's processes, and of this one (the client and the front doors):
    `jobs` jobs of CPU_BLOCKS blocks less as many of the same jobs without blocks, per block (/proc, 10 ms
    ticks: hence the long jobs). CPU, unlike wall time, hardly moves with the machine's load."""
    out = {}
    for name, model in models.items():
        spent: dict[str, dict[str, float]] = {}
        for case, job in (("blocks", lambda model=model: blocks_job(model, CPU_BLOCKS, [])),
                          ("none", lambda model=model: no_blocks_job(model, CPU_BLOCKS))):
            before = {key: processes_cpu(group) for key, group in pids[name].items()} | {"this": time.process_time()}
            for _ in range(jobs):
                job()
            after = {key: processes_cpu(group) for key, group in pids[name].items()} | {"this": time.process_time()}
            spent[case] = {key: after[key] - before[key] for key in after}
        out[name] = {key: (spent["blocks"][key] - spent["none"][key]) * 1e3 / (jobs * CPU_BLOCKS)
                     for key in spent["blocks"]}
    return out


def _throughput(server: Any, names: list[str], budget: float) -> dict[str, dict[str, Any]]:
    """Jobs/s of CLIENTS threads (each with its own LanguageModel) per model, in ROUNDS alternating windows, and
    the CPU its replica actors got meanwhile (in cores: on a busy machine it bounds what a replica adds)."""
    models = {name: [LanguageModel(name, host=server.address) for _ in range(CLIENTS)] for name in names}
    pids = {name: [r.worker_pid(60) for r in server.hub.queues[name].replicas] for name in names}
    for clients in models.values():
        for model in clients:
            _job(model)
    totals = {name: {"jobs": 0, "seconds": 0.0, "replica_cpu_s": 0.0} for name in names}
    window = budget / (ROUNDS * len(names))
    for _ in range(ROUNDS):
        random.shuffle(names)
        for name in names:
            clients = models[name]
            cpu = processes_cpu(pids[name])
            run = concurrent_clients(CLIENTS, lambda i, k, clients=clients: _job(clients[i]), window, cap=1 << 30)
            totals[name]["replica_cpu_s"] += processes_cpu(pids[name]) - cpu
            totals[name]["jobs"] += run["jobs"]
            totals[name]["seconds"] += run["seconds"]
    for total in totals.values():
        total["jobs_per_s"] = total["jobs"] / total["seconds"]
        total["replica_cores"] = total["replica_cpu_s"] / total["seconds"]
    return totals


def run(options: Options | None = None) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from tether.server.cluster import shut_down

    options = options or Options()
    scale = options.budget_scale
    torch.set_num_threads(1)
    started, load_at_start = time.perf_counter(), load()
    forward_ms = _forward_ms()
    log(NAME, f"one forward of the wide model: {forward_ms:.1f} ms of CPU; starting a Ray head on 127.0.0.1 ...")
    head = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.1", "num_cpus": 5, "include_dashboard": False, "object_store_memory": 100 << 20})
    servers: list = []
    data: dict[str, Any] = {"wide_forward_ms": forward_ms}
    try:
        ray.init(address=head.address, log_to_driver=False)
        log(NAME, "starting the servers ...")
        limits = {"queue_size": 64, "result_ttl": 5.0, "max_batch": 1}
        embedded = start_server({"tiny": tiny_gpt2()}, **limits)
        servers.append(embedded)
        on_ray = start_server({"tiny": tiny_gpt2(), "wide1": wide_gpt2()}, ray=head.address, **limits)
        servers.append(on_ray)
        calls_only = start_server({"tiny": tiny_gpt2()}, ray=head.address, ray_namespace=NO_LANES, ray_lanes=False,
                                  **limits)
        servers.append(calls_only)
        Admin(on_ray.address).deploy("wide2", "bench.cluster:wide_gpt2",
                                     replicas=2, wait=180)
        for server in servers:
            assert server.wait_ready(timeout=180), "a server's workers did not start"
        with quiet_client():
            local_model = LanguageModel("tiny", host=embedded.address)
            ray_model = LanguageModel("tiny", host=on_ray.address)
            calls_model = LanguageModel("tiny", host=calls_only.address)
            log(NAME, "latency and local() round trips ...")
            times, _ = interleaved({
                "embedded": lambda: _job(local_model), "ray": lambda: _job(ray_model),
                "embedded_block": lambda: _block_job(local_model), "ray_block": lambda: _block_job(ray_model),
                "calls": lambda: _job(calls_model), "calls_block": lambda: _block_job(calls_model),
            }, LATENCY_BUDGET_S * scale, min_reps=3, max_reps=1 << 30, seed=random.randrange(1 << 30))
            added = paired(times["ray"], times["embedded"])
            data["latency"] = {
                "embedded_p50_ms": median(times["embedded"]), "ray_p50_ms": median(times["ray"]),
                "added_p50_ms": median(added), "added_p90_ms": pct(added, 90), "n": len(added),
                "local_ray_p50_ms": median(paired(times["ray_block"], times["ray"])),
                "local_embedded_p50_ms": median(paired(times["embedded_block"], times["embedded"])),
                "added_calls_p50_ms": median(paired(times["calls"], times["embedded"])),
                "local_calls_p50_ms": median(paired(times["calls_block"], times["calls"])),
            }
            log(NAME, f"local() round trips ({BLOCKS} blocks a job) ...")
            data["round_trip"] = _round_trips({"embedded": local_model, "ray": ray_model, "calls": calls_model},
                                              ROUND_TRIP_BUDGET_S * scale)
            log(NAME, "CPU per local() round trip, by process ...")
            data["round_trip_cpu"] = _round_trip_cpu(
                {"embedded": local_model, "ray": ray_model, "calls": calls_model},
                {"embedded": {"worker": [embedded.hub.queues["tiny"].replicas[0].worker_pid(60)]},
                 "ray": _cluster_pids(on_ray, "tether"), "calls": _cluster_pids(calls_only, NO_LANES)},
                max(4, round(CPU_JOBS * scale)))
            log(NAME, "jobs/s with 1 and 2 replicas ...")
            data["throughput"] = _throughput(on_ray, ["wide1", "wide2"], THROUGHPUT_BUDGET_S * scale)
    finally:
        close_all()
        for server in servers:
            server.stop(grace=0)
        for namespace in ("tether", NO_LANES):
            shut_down(namespace)  # the cluster's part (its cores and replica actors)
        ray.shutdown()
        head.shutdown()
    return _result(data, scale, load_at_start, started)


def _result(data: dict[str, Any], scale: float, load_at_start: float | None, started: float) -> dict:
    env = environment(load_at_start)
    lat, put, trip, cpu = data["latency"], data["throughput"], data["round_trip"], data["round_trip_cpu"]
    speedup = put["wide2"]["jobs_per_s"] / put["wide1"]["jobs_per_s"]
    return {
        "name": NAME,
        "title": TITLE,
        "environment": env,
        "settings": {"prompt": PROMPT, "budget_scale": scale, "clients": CLIENTS, "torch_threads_per_replica": 1,
                     "wide_model": WIDE, "max_batch": 1, "rounds": ROUNDS,
                     "cluster": "Ray head on 127.0.0.1, 5 logical CPUs; servers in-process"},
        "tables": [
            {"title": "Latency (ms)", "columns": ["what", "p50", "p90", "n"], "rows": [
                ["job on the embedded server", ms(lat["embedded_p50_ms"]), "", str(lat["n"])],
                ["job through Ray (1 replica)", ms(lat["ray_p50_ms"]), "", str(lat["n"])],
                ["added by Ray (paired)", ms(lat["added_p50_ms"]), ms(lat["added_p90_ms"]), str(lat["n"])],
                ["added by Ray without lanes (paired)", ms(lat["added_calls_p50_ms"]), "", str(lat["n"])],
            ]},
            {"title": (f"One local() round trip (ms): client stamps of consecutive blocks, {BLOCKS} a job, "
                       "4 floats each way, as bench/local_blocks.py"),
             "columns": ["what", "p50", "p90", "n"], "rows": [
                 [label, ms(trip[key]["p50_ms"]), ms(trip[key]["p90_ms"]), str(trip[key]["n"])]
                 for key, label in (("ray", "through Ray"), ("calls", "through Ray without lanes"),
                                    ("embedded", "embedded"))] + [
                 [f"old method, {label}: job with one block - job without (paired)", ms(lat[key]), "",
                  str(lat["n"])]
                 for key, label in (("local_ray_p50_ms", "through Ray"),
                                    ("local_calls_p50_ms", "through Ray without lanes"),
                                    ("local_embedded_p50_ms", "embedded"))]},
            {"title": (f"CPU per local() round trip by process (ms): {CPU_BLOCKS}-block jobs less the same jobs "
                       "without blocks, per block; /proc"),
             "columns": ["server", "process", "CPU ms"], "rows": [
                 [label, process, ms(cpu[key][process])]
                 for key, label in (("ray", "through Ray"), ("calls", "through Ray without lanes"),
                                    ("embedded", "embedded"))
                 for process in [p for p in ("core", "actor", "worker") if p in cpu[key]] + ["this"]]},
            {"title": f"Throughput ({CLIENTS} client threads; one forward: {data['wide_forward_ms']:.1f} ms of CPU)",
             "columns": ["replicas", "jobs", "jobs/s", "vs 1 replica", "replicas' CPU (cores)"], "rows": [
                 [str(n), str(put[f"wide{n}"]["jobs"]), f"{put[f'wide{n}']['jobs_per_s']:.1f}",
                  f"{put[f'wide{n}']['jobs_per_s'] / put['wide1']['jobs_per_s']:.2f}x",
                  f"{put[f'wide{n}']['replica_cores']:.2f}"] for n in (1, 2)]},
        ],
        "targets": [
            {"key": "added_latency", "name": "latency Ray adds to a job over the embedded server, p50",
             "value": lat["added_p50_ms"], "limit": TARGET_MS, "ok": lat["added_p50_ms"] <= TARGET_MS,
             "text": f"{ms(lat['added_p50_ms'])} ms (p90 {ms(lat['added_p90_ms'])} ms)"},
            {"key": "local_round_trip", "name": "one local() round trip through Ray, p50",
             "value": trip["ray"]["p50_ms"], "limit": TARGET_MS, "ok": trip["ray"]["p50_ms"] <= TARGET_MS,
             "text": f"{ms(trip['ray']['p50_ms'])} ms (embedded {ms(trip['embedded']['p50_ms'])} ms)"},
        ],
        "notes": busy_note(env) + [
            f"The machine has {os.cpu_count()} CPUs; a second replica needs a free core to add throughput "
            f"(measured: {speedup:.2f}x). The replicas' CPU column is what their actor processes got during their "
            "windows: where other work takes the cores (or the kernel's autogroup scheduling gives this session, "
            "Ray's actors included, one share), two replicas get no more CPU than one, and cannot run faster."],
        "data": data,
        "seconds": time.perf_counter() - started,
    }


if __name__ == "__main__":
    result = run(Options(budget_scale=0.1 if "--quick" in sys.argv else 1.0))
    from .run import render_text

    for table in result["tables"]:
        print(render_text(table))
