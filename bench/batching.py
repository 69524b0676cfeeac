"""Cross-job batching: jobs/s and per-job latency with batching on (the default) against `--max-batch 1`.

Two `tether serve` processes host the same model side by side, one batching and one not; 4 and 16 client
threads each run blocking jobs back to back on one server, then on the other: a 16-token generation with a
per-step save, and a single traced forward with one save. Each client count runs ROUNDS such pairs of windows,
in alternating order, and its ratio is the median of the rounds' ratios: this machine's speed drifts by tens of
percent within minutes, and a drift then falls on both sides of a round alike. A window's jobs/s is its steady
rate: the jobs that end after its first n (one per client, on average each client's first) over the time from
then to its last. Clients that start together reach the server a few ms apart, so the batching server's first
run of a window is often one job alone and its second the rest; the steady rate leaves that start-up out on
both sides (a server with no batching has none), and the whole window's rate is kept beside it.

A lone job (1 client) is timed paired: one client runs each prompt on both servers, in a fresh random order per repetition, so the load of the moment and the
drift of a window fall on both sides alike and the paired difference is what batching adds to a lone job.
Last, with the servers stopped, transformers' own `generate` of the same prompts one call each against one
padded call: the most a batched run could gain on this machine (the served ratio is read against it).
`TETHER_BENCH_BATCHING_MODEL=tiny` swaps SmolLM2 for the tiny GPT-2 (a smoke run).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from typing import Any

from bench import Options
from bench._common import (
    ROOT,
    busy_note,
    concurrent_clients,
    environment,
    host,
    interleaved,
    load,
    log,
    median,
    ms,
    paired,
    pct,
    quiet_client,
)

NAME = "batching"
TITLE = "Cross-job batching: 16 concurrent clients, batching on vs --max-batch 1 (separate server processes)"
CLIENTS = (1, 4, 16)
NEW_TOKENS = 16
BUDGET_S = 36.0  # per case, client count and server (split over ROUNDS windows)
LONE_BUDGET_S = 40.0  # per case: one client's jobs alternating between the servers
ROUNDS = 3  # paired windows per case and client count (at least 2 whatever the budget)
JOB_CAP = 400  # jobs per case, client count and server
GENERATE_TARGET = 4.0  # jobs/s with batching over without, 16 clients, generation
BATCH_WAIT_MS = 5.0
WARMUP_JOBS = 3  # per case and server, before timing
PROMPTS = ["The Eiffel Tower is", "Once upon a time, in a small village by the sea,", "Water boils at",
           "The three primary colours are red,", "In 1969 the first people to walk on the Moon",
           "A good cup of tea needs", "Photosynthesis turns light into", "The capital of Japan is"]


def generate_job(lm: Any, prompt: str) -> None:
    """A 16-token generation that saves the last position's logits at every step."""
    with lm.generate(prompt, max_new_tokens=NEW_TOKENS, remote=True) as tracer:
        steps = list().save()
        with tracer.all():
            steps.append(lm.lm_head.output[0, -1])
        out = lm.generator.output.save()
    assert len(steps) == NEW_TOKENS and out.shape[1] > NEW_TOKENS


def trace_job(lm: Any, prompt: str) -> None:
    """One traced forward of a short prompt, with one save."""
    with lm.trace(prompt, remote=True):
        logits = lm.lm_head.output[:, -1].save()
    assert logits.dim() == 2


CASES = {"generate": generate_job, "trace": trace_job}


class _Server:
    """`tether serve` in its own process, as deployed: its replica runs in its own worker process (batches are
    gathered by the front door and run there); `--port 0`, so two never compete for the default port."""

    def __init__(self, spec: str, *extra: str):
        args = [sys.executable, "-m", "tether", "serve", "--port", "0", "--model", f"m={spec}",
                "--queue-size", "64", "--result-ttl", "5", *extra]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.address = ""

    def wait(self, timeout: float = 300.0) -> str:
        line = [""]
        reader = threading.Thread(target=lambda: line.__setitem__(0, self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line[0].startswith("tether: serving on "):
            raise RuntimeError(f"tether serve did not report its address (got {line[0]!r})")
        self.address = line[0].split("serving on ", 1)[1].strip()
        return self.address

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _clients(job, n: int, budget_s: float) -> dict:
    """n threads, each with its own remote model, running blocking jobs back to back until the budget."""
    models = [_remote_model() for _ in range(n)]
    return concurrent_clients(n, lambda i, k: job(models[i], PROMPTS[(i + k) % len(PROMPTS)]), budget_s,
                              cap=max(2, JOB_CAP // n), ends=True)


def _paired_rounds(case: str, job, n: int, addresses: dict[str, str], rounds: int, window_s: float) -> dict:
    """`rounds` pairs of windows of n clients, one server then the other (the other idles), in alternating order:
    each side's row pooled over its windows, and the ratio of each round (batched steady jobs/s over alone)."""
    windows: dict[str, list[dict]] = {"alone": [], "batching": []}
    ratios, whole_ratios = [], []
    for i in range(rounds):
        for name in ("alone", "batching") if i % 2 == 0 else ("batching", "alone"):
            with host(addresses[name]):
                windows[name].append(_steady(_clients(job, n, window_s), n))
        off, on = windows["alone"][-1], windows["batching"][-1]
        ratios.append(on["jobs_per_s"] / off["jobs_per_s"])
        whole_ratios.append(on["whole_jobs_per_s"] / off["whole_jobs_per_s"])
        log(NAME, f"{case}, {n} clients, round {i + 1}: alone {off['jobs_per_s']:.2f} jobs/s (whole window "
                  f"{off['whole_jobs_per_s']:.2f}), batching {on['jobs_per_s']:.2f} (whole window "
                  f"{on['whole_jobs_per_s']:.2f}), {ratios[-1]:.2f}x")
    pair: dict[str, Any] = {name: _pooled(rows) for name, rows in windows.items()}
    pair.update(round_ratios=ratios, ratio=median(ratios), whole_ratio=median(whole_ratios), load_1m=load())
    return pair


def _steady(row: dict, n: int) -> dict:
    """A window's row with its steady rate as `jobs_per_s` (the jobs after its first n; the whole window's
    rate as `whole_jobs_per_s`)."""
    ends = row.pop("ends_s")
    steady = dict(row, whole_jobs=row["jobs"], whole_seconds=row["seconds"], whole_jobs_per_s=row["jobs_per_s"])
    if len(ends) > n and ends[-1] > ends[n - 1]:
        steady.update(jobs=len(ends) - n, seconds=ends[-1] - ends[n - 1])
        steady["jobs_per_s"] = steady["jobs"] / steady["seconds"]
    return steady


def _pooled(rows: list[dict]) -> dict:
    """One side's windows as one row: steady jobs/s over all of them (and the whole windows' rate); latency
    percentiles of the windows' medians and worst p99 (the windows keep no per-job list)."""
    jobs, seconds = sum(r["jobs"] for r in rows), sum(r["seconds"] for r in rows)
    whole = sum(r["whole_jobs"] for r in rows) / sum(r["whole_seconds"] for r in rows)
    return {"clients": rows[0]["clients"], "jobs": jobs, "seconds": seconds, "jobs_per_s": jobs / seconds,
            "whole_jobs_per_s": whole,
            "p50_ms": median([r["p50_ms"] for r in rows]), "p99_ms": max(r["p99_ms"] for r in rows),
            "min_jobs_per_client": min(r["min_jobs_per_client"] for r in rows), "windows": rows}


def _lone_paired(job, models: dict[str, Any], budget_s: float) -> dict:
    """One client alternating its jobs between the servers (`models`: one remote model per server), each
    repetition one prompt on both in a fresh random order: each side's row, and the paired difference of
    batching's latency minus the other's (ms)."""
    calls = dict.fromkeys(models, 0)

    def case(name: str):
        def run() -> None:
            job(models[name], PROMPTS[calls[name] % len(PROMPTS)])
            calls[name] += 1
        return run

    times, reps = interleaved({name: case(name) for name in models}, budget_s, min_reps=10, max_reps=JOB_CAP,
                              warmup=1)
    pair: dict[str, Any] = {name: _row(values) for name, values in times.items()}
    diff = paired(times["batching"], times["alone"])
    pair["paired"] = {"reps": reps, "p50_ms": median(diff), "p90_ms": pct(diff, 90), "ci95_ms": _median_ci(diff)}
    return pair


def _median_ci(values: list[float], resamples: int = 2000) -> tuple[float, float]:
    """A 95% bootstrap interval of the median of `values`: how far the median of this many pairs can move by
    chance alone (a ~1 s generation varies by tens of ms from one run to the next on this machine)."""
    rng = random.Random(0)
    medians = sorted(median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def _model_ceiling(spec: str, reps: int) -> dict:
    """What the model itself allows, with no server: transformers' `generate` of n prompts in one left-padded call
    against the same n prompts one call each (greedy, NEW_TOKENS new tokens, as the jobs), `reps` interleaved
    repetitions; their ratio is the most that running n jobs as one batch could gain."""
    import torch

    from tether.loading import load_named

    model, tokenizer = load_named(spec)
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def call(prompts: list[str]) -> float:
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=pad)
        return time.perf_counter() - started

    call(PROMPTS[:2])
    out = {}
    for n in CLIENTS[1:]:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        one_each, together = [], []
        for rep in range(reps):
            for side in ("one", "all") if rep % 2 == 0 else ("all", "one"):
                if side == "one":
                    one_each.append(sum(call([prompt]) for prompt in prompts))
                else:
                    together.append(call(prompts))
        out[str(n)] = {"one_call_each_s": median(one_each), "one_call_s": median(together),
                       "ratio": median(one_each) / median(together), "reps": reps}
        log(NAME, f"the model alone, {n} prompts: one call each {median(one_each):.2f} s, one call "
                  f"{median(together):.2f} s, {out[str(n)]['ratio']:.2f}x")
    return out


def _row(latencies: list[float]) -> dict:
    """A side's row of sequential jobs (one client): jobs/s as the inverse of its mean latency."""
    return {"clients": 1, "jobs": len(latencies), "seconds": sum(latencies) / 1e3,
            "jobs_per_s": len(latencies) / (sum(latencies) / 1e3), "p50_ms": median(latencies),
            "p99_ms": pct(latencies, 99), "min_jobs_per_client": len(latencies)}


def _remote_model(address: str | None = None) -> Any:
    """The served model, as a client sees it (its spec from the server at `address`, default CONFIG.API.HOST)."""
    from tether import LanguageModel

    return LanguageModel("m") if address is None else LanguageModel("m", host=address)


def run(options: Options | None = None) -> dict:
    options = options or Options()
    scale = options.budget_scale
    spec = os.environ.get("TETHER_BENCH_BATCHING_MODEL", "smollm2")
    started, load_at_start = time.perf_counter(), load()
    servers = {"batching": _Server(spec, "--batch-wait-ms", str(BATCH_WAIT_MS)), "alone": _Server(spec, "--max-batch", "1")}
    data: dict[str, Any] = {}
    try:
        addresses = {name: server.wait() for name, server in servers.items()}
        log(NAME, f"serving {spec}: {addresses}")
        with quiet_client():
            for address in addresses.values():  # first jobs load weights and warm caches: not timed
                with host(address):
                    warm = _remote_model()
                    for job in CASES.values():
                        for prompt in PROMPTS[:WARMUP_JOBS]:
                            job(warm, prompt)
            lone = {name: _remote_model(address) for name, address in addresses.items()}
            for case, job in CASES.items():
                pair = data.setdefault(case, {})["1"] = _lone_paired(job, lone, LONE_BUDGET_S * scale)
                pair["load_1m"] = load()
                log(NAME, f"{case}, 1 client, paired: {pair['paired']['reps']} pairs, p50 alone "
                          f"{pair['alone']['p50_ms']:.1f} ms, batching {pair['batching']['p50_ms']:.1f} ms, "
                          f"paired difference p50 {pair['paired']['p50_ms']:+.1f} ms")
            runs = [(case, job, n) for case, job in CASES.items() for n in CLIENTS if n > 1]
            rounds = max(2, round(ROUNDS * min(1.0, scale)))
            for case, job, n in runs:
                data.setdefault(case, {})[str(n)] = _paired_rounds(case, job, n, addresses, rounds,
                                                                   BUDGET_S * scale / rounds)
    finally:
        for server in servers.values():
            server.stop()
    ceiling = _model_ceiling(spec, max(1, round(2 * scale)))  # (the servers stopped: nothing else runs)
    env = environment(load_at_start)
    return {
        "name": NAME,
        "title": TITLE,
        "environment": env,
        "settings": {"model": spec, "clients": list(CLIENTS), "new_tokens": NEW_TOKENS, "budget_scale": scale,
                     "batch_wait_ms": BATCH_WAIT_MS, "servers": "tether serve processes, default torch threads"},
        "tables": _tables(data) + [_ceiling_table(ceiling, data)],
        "targets": _targets(data, ceiling),
        "notes": busy_note(env),
        "data": data,
        "ceiling": ceiling,
        "seconds": time.perf_counter() - started,
    }


def _tables(data: dict) -> list[dict]:
    tables = []
    for case, by_n in data.items():
        rows = []
        for n, pair in sorted(by_n.items(), key=lambda item: int(item[0])):
            on, off = pair["batching"], pair["alone"]
            diff = pair.get("paired")
            rows.append([n + (" (paired)" if diff else ""), f"{off['jobs_per_s']:.2f}", f"{on['jobs_per_s']:.2f}",
                         _ratio_cell(pair), ms(off["p50_ms"]), ms(on["p50_ms"]),
                         f"{diff['p50_ms']:+.1f}" if diff else "-", ms(off["p99_ms"]), ms(on["p99_ms"]),
                         "?" if pair.get("load_1m") is None else f"{pair['load_1m']:.2f}"])
        tables.append({"title": f"{case}: jobs/s and per-job latency (ms); 1 client: jobs alternating between "
                                "the servers, with the median of the paired differences (batched - alone)",
                       "columns": ["clients", "jobs/s alone", "jobs/s batched",
                                   "ratio (median of rounds: each round's; the same of whole windows)",
                                   "p50 alone", "p50 batched", "p50 paired diff", "p99 alone", "p99 batched",
                                   "load (1 min)"], "rows": rows})
    return tables


def _ratio(pair: dict) -> float:
    """Batched jobs/s over alone: the median of the paired rounds where there are rounds (several clients)."""
    return pair["ratio"] if "ratio" in pair else pair["batching"]["jobs_per_s"] / pair["alone"]["jobs_per_s"]


def _ratio_cell(pair: dict) -> str:
    rounds = pair.get("round_ratios")
    if not rounds:
        return f"{_ratio(pair):.2f}x"
    return (f"{_ratio(pair):.2f}x (" + ", ".join(f"{r:.2f}" for r in rounds)
            + f"; whole windows {pair['whole_ratio']:.2f}x)")


def _ceiling_table(ceiling: dict, data: dict) -> dict:
    rows = []
    for n, row in ceiling.items():
        served = data.get("generate", {}).get(n)
        got = _ratio(served) if served else None
        rows.append([n, f"{row['one_call_each_s']:.2f}", f"{row['one_call_s']:.2f}", f"{row['ratio']:.2f}x",
                     "-" if got is None else f"{got:.2f}x", "-" if got is None else f"{got / row['ratio']:.0%}"])
    return {"title": "generate: what the model itself allows (transformers alone, no server: n prompts one call each "
                     "vs one left-padded call; median of interleaved repetitions, seconds)",
            "columns": ["prompts", "one call each s", "one call s", "model's ratio", "served ratio (above)",
                        "served / model's"], "rows": rows}


def _targets(data: dict, ceiling: dict) -> list[dict]:
    targets = []
    generate = data.get("generate", {}).get("16")
    if generate:
        ratio = _ratio(generate)
        model = ceiling.get("16", {}).get("ratio")
        allows = f"; transformers alone: {model:.2f}x for 16 prompts in one call" if model else ""
        rounds = len(generate["round_ratios"])
        targets.append({"name": "generate_16_clients", "text": f"16-client generation: {ratio:.2f}x the jobs/s of "
                        f"--max-batch 1, median of {rounds} paired rounds (target >= {GENERATE_TARGET:g}x{allows})",
                        "ok": ratio >= GENERATE_TARGET, "limit": GENERATE_TARGET, "at_least": True, "value": ratio})
    for case, by_n in data.items():
        lone = by_n.get("1")
        if lone:
            added = lone["paired"]["p50_ms"]
            low, high = lone["paired"]["ci95_ms"]
            targets.append({"name": f"{case}_lone_job", "text": f"{case}, one client: batching adds {added:.1f} ms "
                            f"to a lone job (median of {lone['paired']['reps']} paired differences, 95% interval "
                            f"{low:+.1f} to {high:+.1f} ms; limit: the batch wait, {BATCH_WAIT_MS:g} ms)",
                            "ok": added <= BATCH_WAIT_MS, "limit": BATCH_WAIT_MS, "value": added})
    return targets
