"""`python -m bench._profile_child SCENARIO N`: profile every Python thread of an in-process server + client.

Run by bench/_common.profile_child in a fresh process, so that every thread (the client's, the server's
RPC, reader and worker threads, gRPC's poller) starts after `threading.setprofile` installed a per-thread
cProfile with a per-thread CPU clock (`time.thread_time`): time a thread spends blocked counts ~0. The
profiles are snapshotted before and after the N measured units (warm-up excluded) and the difference is
printed as one JSON line, grouped into client, server and other threads.

Scenarios: "job" (a tiny-model remote trace with two saves; unit: job), "local_block" (a remote trace running
a small local() block BLOCKS times in a loop; unit: local block) and "big_result" (a remote trace saving a
256 MiB torch.randn made on the server; unit: job).
"""

from __future__ import annotations

import cProfile
import json
import os
import sys
import threading
import time

import torch

from tether import LanguageModel, tiny
from tether.server.app import start_server

from ._common import ROOT, host, quiet_client, side_of, thread_group
from .local_blocks import BLOCKS, blocks_job
from .remote import save_randn, two_saves

WARMUP = 20

_PROFILES: list[tuple[threading.Thread, cProfile.Profile]] = []
_LOCK = threading.Lock()


def _boot(frame, event, arg):  # the first profile event of a new thread: give it its own profiler
    sys.setprofile(None)
    profile = cProfile.Profile(time.thread_time)
    with _LOCK:
        _PROFILES.append((threading.current_thread(), profile))
    profile.enable()


def _key(entry) -> str:
    code = entry.code
    if isinstance(code, str):
        return code
    path = code.co_filename
    if path.startswith(ROOT + os.sep):
        path = os.path.relpath(path, ROOT)
    elif "site-packages" + os.sep in path:
        path = path.split("site-packages" + os.sep, 1)[1]
    elif "/lib/python3" in path:
        path = "stdlib/" + path.split("/lib/python3", 1)[1].split("/", 1)[-1]
    if path.startswith("bench" + os.sep) and code.co_name == "<module>":
        return f"{path}:{code.co_firstlineno}(<module>): a body exec'd from this file (the local() block's)"
    return f"{path}:{code.co_firstlineno}({code.co_name})"


def _project(key: str) -> bool:
    return key.startswith(("client/", "server/", "runtime/", "tether/"))


def _snapshot() -> dict[tuple[str, str], tuple[int, float, float]]:
    """(thread group, function) -> (calls, own seconds, cumulative seconds), summed over threads."""
    out: dict[tuple[str, str], list] = {}
    with _LOCK:
        profiles = list(_PROFILES)
    for thread, profile in profiles:
        group = thread_group(thread.name)
        for entry in profile.getstats():
            row = out.setdefault((group, _key(entry)), [0, 0.0, 0.0])
            row[0] += entry.callcount
            row[1] += entry.inlinetime
            row[2] += entry.totaltime
    return {k: tuple(v) for k, v in out.items()}


def main(argv: list[str]) -> int:
    scenario, n = argv[0], int(argv[1])
    threading.setprofile(_boot)  # every thread started from here on (server, gRPC, client loop) is profiled
    torch.set_num_threads(1)
    main_profile = cProfile.Profile(time.thread_time)
    with _LOCK:
        _PROFILES.append((threading.main_thread(), main_profile))
    model, tokenizer = tiny.tiny_gpt2()
    server = start_server({"tiny": (model, tokenizer)}, queue_size=64, result_ttl=5.0)
    with quiet_client(), host(server.address):
        rllm = LanguageModel("tiny")
        if scenario == "job":
            def unit_run():
                two_saves(rllm, remote=True)
            jobs, unit = n, "job"
        elif scenario == "local_block":
            stamps: list[float] = []

            def unit_run():
                out = blocks_job(rllm, BLOCKS, stamps)
                assert out.shape == (4,)
            jobs, unit = max(1, n // BLOCKS), "local block"
        elif scenario == "big_result":
            def unit_run():
                assert save_randn(rllm).shape == (64, 1024, 1024)
            jobs, unit = n, "256 MiB job"
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
        for _ in range(1 if scenario == "big_result" else WARMUP):
            unit_run()
        before = _snapshot()  # the main thread's profiler is not running yet: it only sees the measured units
        wall = time.perf_counter()
        main_profile.enable()
        for _ in range(jobs):
            unit_run()
        main_profile.disable()
        wall = time.perf_counter() - wall
        after = _snapshot()
    server.stop(grace=0)
    units = jobs * (BLOCKS if scenario == "local_block" else 1)
    sides: dict[str, dict] = {}
    for (group, key), (calls, own, cum) in after.items():
        b = before.get((group, key), (0, 0.0, 0.0))
        calls, own, cum = calls - b[0], own - b[1], cum - b[2]
        if calls <= 0 and own <= 0:
            continue
        side = sides.setdefault(side_of(group), {"threads": set(), "rows": {}})
        side["threads"].add(group)
        row = side["rows"].setdefault(key, [0, 0.0, 0.0])
        row[0] += calls
        row[1] += own
        row[2] += cum
    summary = {"scenario": scenario, "n": units, "unit": unit, "jobs": jobs, "wall_ms_per_unit": wall * 1e3 / units,
               "sides": {}}
    for side, data in sides.items():
        rows = [{"where": k, "calls": c / units, "own_ms": o * 1e3 / units, "cum_ms": t * 1e3 / units}
                for k, (c, o, t) in data["rows"].items()]
        summary["sides"][side] = {
            "threads": sorted(data["threads"]),
            "total_ms": sum(r["own_ms"] for r in rows),
            "own": sorted(rows, key=lambda r: -r["own_ms"])[:40],
            "project_cum": sorted((r for r in rows if _project(r["where"])), key=lambda r: -r["cum_ms"])[:40],
        }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
