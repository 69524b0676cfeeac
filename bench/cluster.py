"""Replicas on a Ray cluster (`tether serve --ray`, issue 13): jobs/s with 1 and 2 replicas, the latency Ray
adds to a job over the embedded server (local worker processes), and a local() round trip through Ray.

A Ray head on 127.0.0.1 (4 logical CPUs, no dashboard) is started by this benchmark and stopped after; three
in-process servers host the same tiny GPT-2: embedded (1 replica, worker processes), Ray with 1 replica and
Ray with 2 replicas (each actor asks Ray for 1 CPU, so Ray sets its torch threads to 1). The client runs in
this process, one torch thread.

1. latency: the same job (one save) on the embedded server and on Ray (1 replica), interleaved in a fresh
   random order each repetition; what Ray adds is the distribution of per-repetition (paired) differences.
2. local() round trip: a job with one local() block minus the same job without, paired, through Ray and
   through the embedded server.
3. jobs/s: 4 client threads running blocking remote traces until the time budget is spent, on Ray with 1 and
   with 2 replicas (the second replica only helps on a machine with a core to spare for it).

Run it with `python -m bench.run --only cluster` or `python -m bench.cluster [--quick]`.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the head stays on loopback

import torch

from tether import LanguageModel
from tether.client.channel import close_all
from tether.server.app import start_server
from tether.tiny import tiny_gpt2

from . import Options
from ._common import busy_note, environment, load, log, median, ms, paired, pct, quiet_client

NAME = "cluster"
TITLE = "Replicas as Ray actors: jobs/s, latency over the embedded server, local() through Ray"
PROMPT = "The Eiffel Tower is in the city of"
LATENCY_BUDGET_S = 20.0
THROUGHPUT_BUDGET_S = 10.0
CLIENTS = 4


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


def _timed(job, model) -> float:
    started = time.perf_counter()
    job(model)
    return (time.perf_counter() - started) * 1e3


def _interleaved(cases: dict[str, tuple], budget: float) -> dict[str, list[float]]:
    """Each case's times (ms), one of each per repetition in a fresh random order, until the budget is spent."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for job, model in cases.values():  # warm up: first connections, specs, caches
        job(model)
    end = time.monotonic() + budget
    while time.monotonic() < end or len(next(iter(times.values()))) < 3:
        names = list(cases)
        random.shuffle(names)
        for name in names:
            times[name].append(_timed(*cases[name]))
    return times


def _throughput(address: str, budget: float) -> dict[str, Any]:
    """Jobs/s of CLIENTS threads, each with its own LanguageModel, running jobs until the budget is spent."""
    models = [LanguageModel("tiny", host=address) for _ in range(CLIENTS)]
    for model in models:
        _job(model)
    done = [0] * CLIENTS
    end = time.monotonic() + budget

    def client(i: int) -> None:
        while time.monotonic() < end:
            _job(models[i])
            done[i] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {"jobs": sum(done), "seconds": seconds, "jobs_per_s": sum(done) / seconds}


def run(options: Options | None = None) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from tether.server.cluster import shut_down

    options = options or Options()
    scale = options.budget_scale
    torch.set_num_threads(1)
    started, load_at_start = time.perf_counter(), load()
    log(NAME, "starting a Ray head on 127.0.0.1 ...")
    head = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.1", "num_cpus": 4, "include_dashboard": False, "object_store_memory": 100 << 20})
    servers: list = []
    data: dict[str, Any] = {}
    try:
        ray.init(address=head.address, log_to_driver=False)
        log(NAME, "starting the servers ...")
        embedded = start_server({"tiny": tiny_gpt2()}, queue_size=64, result_ttl=5.0)
        on_ray = start_server({"tiny": tiny_gpt2()}, queue_size=64, result_ttl=5.0, ray=head.address)
        servers += [embedded, on_ray]
        for server in servers:
            assert server.wait_ready(timeout=180), "a server's workers did not start"
        with quiet_client():
            local_model = LanguageModel("tiny", host=embedded.address)
            ray_model = LanguageModel("tiny", host=on_ray.address)
            log(NAME, "latency and local() round trips ...")
            times = _interleaved({
                "embedded": (_job, local_model), "ray": (_job, ray_model),
                "embedded_block": (_block_job, local_model), "ray_block": (_block_job, ray_model),
            }, LATENCY_BUDGET_S * scale)
            added = paired(times["ray"], times["embedded"])
            data["latency"] = {
                "embedded_p50_ms": median(times["embedded"]), "ray_p50_ms": median(times["ray"]),
                "added_p50_ms": median(added), "added_p90_ms": pct(added, 90), "n": len(added),
                "local_ray_p50_ms": median(paired(times["ray_block"], times["ray"])),
                "local_embedded_p50_ms": median(paired(times["embedded_block"], times["embedded"])),
            }
            log(NAME, "jobs/s with 1 replica ...")
            data["replicas_1"] = _throughput(on_ray.address, THROUGHPUT_BUDGET_S * scale)
            on_ray.stop(grace=0)
            servers.remove(on_ray)
            shut_down("tether")  # the cluster's part of it (its core, its replica), so `two` hosts tiny anew
            two = start_server({"tiny": tiny_gpt2()}, queue_size=64, result_ttl=5.0, ray=head.address, replicas=2)
            servers.append(two)
            assert two.wait_ready(timeout=180), "the 2-replica server's workers did not start"
            log(NAME, "jobs/s with 2 replicas ...")
            data["replicas_2"] = _throughput(two.address, THROUGHPUT_BUDGET_S * scale)
    finally:
        close_all()
        for server in servers:
            server.stop(grace=0)
        ray.shutdown()
        head.shutdown()
    env = environment(load_at_start)
    lat = data["latency"]
    return {
        "name": NAME,
        "title": TITLE,
        "environment": env,
        "settings": {"prompt": PROMPT, "budget_scale": scale, "clients": CLIENTS, "torch_threads_per_replica": 1,
                     "cluster": "Ray head on 127.0.0.1, 4 logical CPUs; servers in-process"},
        "tables": [
            {"title": "Latency (ms)", "columns": ["what", "p50", "p90", "n"], "rows": [
                ["job on the embedded server", ms(lat["embedded_p50_ms"]), "", str(lat["n"])],
                ["job through Ray (1 replica)", ms(lat["ray_p50_ms"]), "", str(lat["n"])],
                ["added by Ray (paired)", ms(lat["added_p50_ms"]), ms(lat["added_p90_ms"]), str(lat["n"])],
                ["one local() round trip through Ray (paired)", ms(lat["local_ray_p50_ms"]), "", str(lat["n"])],
                ["one local() round trip, embedded (paired)", ms(lat["local_embedded_p50_ms"]), "", str(lat["n"])],
            ]},
            {"title": f"Throughput ({CLIENTS} client threads)", "columns": ["replicas", "jobs", "jobs/s"], "rows": [
                [str(n), str(data[f"replicas_{n}"]["jobs"]), f"{data[f'replicas_{n}']['jobs_per_s']:.1f}"]
                for n in (1, 2)]},
        ],
        "targets": [],
        "notes": busy_note(env) + [f"The machine has {os.cpu_count()} CPUs; a second replica needs a free core "
                                   "to add throughput."],
        "data": data,
        "seconds": time.perf_counter() - started,
    }


if __name__ == "__main__":
    result = run(Options(budget_scale=0.1 if "--quick" in sys.argv else 1.0))
    from .run import render_text

    for table in result["tables"]:
        print(render_text(table))
