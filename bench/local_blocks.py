"""`local()` blocks of a remote job on loopback: the round trip of one block, and its cost per generated token
(issue 4, "Benchmark").

An in-process server (127.0.0.1, port 0) hosts the tiny GPT-2 (2 layers, width 64); the client runs in the same
process, CPU, one torch thread. Measured side by side in one run:

1. round trip of one `with tracer.local():` block carrying a small value (a 4-float tensor from the server,
   `x = x + 1` on the client, back to the server): a remote trace runs BLOCKS such blocks in a loop, and each
   block appends `time.perf_counter()` on the client, so consecutive stamps are one full round trip each
   (answer out, server resumes, next call in, block runs): p50/p99 over every block. Cross-check: the same
   job with the loop's `x = x + 1` run on the server (no blocks), interleaved; (with - without) / BLOCKS.
   For scale, bare Python gRPC bidi round trips (64-byte echo; sync stub, and grpc.aio driven from another
   thread as tether's client is), in the same run.
2. a 32-token remote generation (max_new_tokens=32, min_new_tokens=32, greedy) with a local() block at every
   step (`tracer.all()`; the block reads the step's argmax token) vs the same remote generation without the
   block, interleaved; per-token cost = paired difference / 32. The local generation is timed too, for scale.
   The job reads nothing that block binds, so it goes on while the client runs it; a third case binds a value
   the job reads after the block, so each step waits for the answer (a full round trip per token).

Targets (issue 4): one block's round trip <= 1 ms p50; a local block costs <= 1 ms per generated token.
When a target is missed (or with `--profile`), the 50-block job is broken down: CPU per thread (/proc), wrapped
timers around the steps of a local call on both sides, and cProfile of every thread (child process).

Run it with `python -m bench.run --only local_blocks` or `python -m bench.local_blocks [--quick] [--profile]`.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from tether import LanguageModel
from tether.client.channel import close_all
from tether.server.app import start_server
from tether.tiny import tiny_gpt2

from . import Options
from ._common import (
    BARE_LABELS,
    bare_latencies,
    busy_note,
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

NAME = "local_blocks"
TITLE = "local() blocks of a remote job on loopback: round trip per block, cost per generated token (tiny GPT-2)"
PROMPT = "The quick brown fox"
BLOCKS = 50  # local() blocks per job in the round-trip measurement
NEW_TOKENS = 32

# seconds at budget_scale 1
ROUND_TRIP_BUDGET_S = 24.0
GENERATION_BUDGET_S = 34.0
BARE_BUDGET_S = 1.5  # per kind
PROFILE_JOBS = 20  # 50-block jobs

ROUND_TRIP_TARGET_MS = 1.0
PER_TOKEN_TARGET_MS = 1.0

STEPS = [
    ("client: LocalCalls.answer (one call: decode, run the block, build the answer)", "tether.client.local",
     "LocalCalls.answer"),
    ("client: from_value_map (decode the values sent)", "tether.client.local", "from_value_map"),
    ("client: local_block_at (find the block in the file's text)", "tether.client.local", "local_block_at"),
    ("client: run_local_block (exec the block's body)", "tether.client.local", "run_local_block"),
    ("client: LocalCalls._encode (encode the answer)", "tether.client.local", "LocalCalls._encode"),
    ("client: JobEvents.feed (every event received)", "tether.client.events", "JobEvents.feed"),
    ("server: LocalCaller.__call__ (one call, waiting for the answer included)", "tether.server.local_calls",
     "LocalCaller.__call__"),
    ("server: encode_value_map (the values sent)", "tether.server.local_calls", "encode_value_map"),
    ("server: LocalLink.call (publish the call, wait for its answer)", "tether.server.local_calls", "LocalLink.call"),
    ("server: Job.event (publish an event)", "tether.server.jobs", "Job.event"),
    ("server: Job.forget_payload (scans the job's whole event log)", "tether.server.jobs", "Job.forget_payload"),
    ("server: LocalLink.deliver (reader thread: the answer arrives)", "tether.server.local_calls", "LocalLink.deliver"),
    ("server: ValueCodec.decode_answer (decode the answer)", "tether.server.program_codec",
     "ValueCodec.decode_answer"),
]


# ---- the bodies ----------------------------------------------------------------------------------------


def blocks_job(lm, n, stamps):
    with lm.trace(PROMPT, remote=True) as tracer:
        x = lm.lm_head.output[0, -1, :4]
        for _ in range(n):
            with tracer.local():
                stamps.append(time.perf_counter())
                x = x + 1
        out = x.save()
    return out


def no_blocks_job(lm, n):
    with lm.trace(PROMPT, remote=True):
        x = lm.lm_head.output[0, -1, :4]
        for _ in range(n):
            x = x + 1
        out = x.save()
    return out


def generate_plain(lm, **remote):
    with lm.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                     **remote) as tracer:
        tracer.all()
        token = lm.lm_head.output[0, -1].argmax(dim=-1)  # noqa: F841 (as in generate_with_block)
        tokens = lm.generator.output.save()
    return tokens


def generate_with_block(lm, stamps, seen, **remote):
    with lm.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                     **remote) as tracer:
        tracer.all()
        token = lm.lm_head.output[0, -1].argmax(dim=-1)
        with tracer.local():
            stamps.append(time.perf_counter())
            seen.append(int(token))
        tokens = lm.generator.output.save()
    return tokens


def generate_with_answered_block(lm, stamps, seen, **remote):
    """As generate_with_block, but the job reads a value the block binds, so it waits for every answer."""
    with lm.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                     **remote) as tracer:
        tracer.all()
        token = lm.lm_head.output[0, -1].argmax(dim=-1)
        with tracer.local():
            stamps.append(time.perf_counter())
            seen.append(int(token))
            chosen = token
        last = chosen  # noqa: F841 (read on the server: the block's answer is waited for)
        tokens = lm.generator.output.save()
    return tokens


# ---- measurement ---------------------------------------------------------------------------------------


def _round_trip(rllm, budget_s: float) -> dict:
    intervals: list[float] = []

    def with_blocks():
        stamps: list[float] = []
        blocks_job(rllm, BLOCKS, stamps)
        intervals.extend((b - a) * 1e3 for a, b in zip(stamps, stamps[1:]))

    stamps: list[float] = []
    out, ref = blocks_job(rllm, BLOCKS, stamps), no_blocks_job(rllm, BLOCKS)
    if len(stamps) != BLOCKS or not torch.equal(out, ref):
        raise AssertionError(f"{len(stamps)} blocks ran (expected {BLOCKS}), or the values differ: {out} vs {ref}")
    cases = {"blocks": with_blocks, "no_blocks": lambda: no_blocks_job(rllm, BLOCKS)}
    t0 = time.perf_counter()
    times, reps = interleaved(cases, budget_s, min_reps=5, max_reps=5000, warmup=3)
    warm = intervals[3 * (BLOCKS - 1):]  # the warm-up jobs' intervals left out
    log(NAME, f"round trip: {reps} repetitions ({len(warm)} block intervals) in {time.perf_counter() - t0:.1f} s")
    per_block = [d / BLOCKS for d in paired(times["blocks"], times["no_blocks"])]
    return {"reps": reps, "blocks_per_job": BLOCKS, "n": len(warm),
            "p50_ms": median(warm), "p90_ms": pct(warm, 90), "p99_ms": pct(warm, 99),
            "job_ms": median(times["blocks"]), "no_blocks_job_ms": median(times["no_blocks"]),
            "per_block_from_jobs_ms": median(per_block), "per_block_from_jobs_p90_ms": pct(per_block, 90)}


def _generation(llm, rllm, budget_s: float) -> dict:
    step_intervals: list[float] = []

    def remote_with_block():
        stamps: list[float] = []
        seen: list[int] = []
        generate_with_block(rllm, stamps, seen, remote=True)
        step_intervals.extend((b - a) * 1e3 for a, b in zip(stamps, stamps[1:]))

    def remote_with_answered_block():
        seen: list[int] = []
        generate_with_answered_block(rllm, [], seen, remote=True)

    # the same tokens every way, and one block per generated token
    want = generate_plain(llm)
    stamps: list[float] = []
    seen: list[int] = []
    got = generate_with_block(rllm, stamps, seen, remote=True)
    plain = generate_plain(rllm, remote=True)
    answered_seen: list[int] = []
    answered = generate_with_answered_block(rllm, [], answered_seen, remote=True)
    if not (torch.equal(want, got) and torch.equal(want, plain) and torch.equal(want, answered)) or (
            len(seen) != NEW_TOKENS or answered_seen != seen):
        raise AssertionError(f"generation differs, or {len(seen)} blocks ran for {NEW_TOKENS} tokens")
    if seen != want[0, -NEW_TOKENS:].tolist():
        raise AssertionError("the blocks saw other tokens than were generated")
    cases = {
        "local": lambda: generate_plain(llm),
        "remote": lambda: generate_plain(rllm, remote=True),
        "remote_block": remote_with_block,
        "remote_answered_block": remote_with_answered_block,
    }
    t0 = time.perf_counter()
    times, reps = interleaved(cases, budget_s, min_reps=5, max_reps=2000, warmup=2)
    log(NAME, f"generation: {reps} repetitions of {len(cases)} cases in {time.perf_counter() - t0:.1f} s")
    warm = step_intervals[2 * (NEW_TOKENS - 1):]
    out: dict[str, Any] = {"reps": reps, "tokens": NEW_TOKENS, "cases": {}}
    for key, t in times.items():
        row = {"p50_ms": median(t), "p99_ms": pct(t, 99), "n": len(t), "per_token_ms": median(t) / NEW_TOKENS}
        if key != "local":
            row["over_local_per_token_ms"] = median(paired(t, times["local"])) / NEW_TOKENS
        out["cases"][key] = row
    per_token = [d / NEW_TOKENS for d in paired(times["remote_block"], times["remote"])]
    answered_per_token = [d / NEW_TOKENS for d in paired(times["remote_answered_block"], times["remote"])]
    out |= {"answered_block_per_token_ms": median(answered_per_token),
            "answered_block_per_token_p90_ms": pct(answered_per_token, 90)}
    out |= {"block_per_token_ms": median(per_token), "block_per_token_p90_ms": pct(per_token, 90),
            "block_per_token_p10_ms": pct(per_token, 10), "step_interval_p50_ms": median(warm),
            "step_interval_p99_ms": pct(warm, 99)}
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
    log(NAME, "starting the server ...")
    server = start_server({"tiny": tiny_gpt2()}, queue_size=64, result_ttl=5.0)
    model, tokenizer = tiny_gpt2()
    llm = LanguageModel(model, tokenizer=tokenizer)
    data: dict[str, Any] = {}
    try:
        with quiet_client(), host(server.address):
            rllm = LanguageModel("tiny")
            data["round_trip"] = _round_trip(rllm, ROUND_TRIP_BUDGET_S * scale)
            data["bare"] = {k: {"p50_ms": median(v), "p99_ms": pct(v, 99), "n": len(v)}
                            for k, v in bare_latencies(["bidi", "aio_bidi"], BARE_BUDGET_S * scale).items()}
            data["generation"] = _generation(llm, rllm, GENERATION_BUDGET_S * scale)
            missed = (data["round_trip"]["p50_ms"] > ROUND_TRIP_TARGET_MS
                      or data["generation"]["block_per_token_ms"] > PER_TOKEN_TARGET_MS)
            if options.profile or missed:
                log(NAME, f"profiling the {BLOCKS}-block job ...")
                n = max(3, int(PROFILE_JOBS * min(1.0, scale * 3)))
                job = lambda: blocks_job(rllm, BLOCKS, [])  # noqa: E731
                data["cpu"] = cpu_by_thread(job, n)
                data["cpu_no_blocks"] = cpu_by_thread(lambda: no_blocks_job(rllm, BLOCKS), n)
                data["steps"] = timed_steps(STEPS, job, n)
                try:
                    data["profile"] = profile_child("local_block", n * BLOCKS)
                except Exception as error:
                    notes.append(f"The cProfile child failed: {error}")
    finally:
        close_all()
        server.stop(grace=0)
    env = environment(load_at_start)
    return {
        "name": NAME,
        "title": TITLE,
        "environment": env,
        "settings": {"prompt": PROMPT, "blocks_per_job": BLOCKS, "new_tokens": NEW_TOKENS, "budget_scale": scale,
                     "threads": 1, "server": "in-process, 127.0.0.1, replicas=1"},
        "tables": _tables(data),
        "targets": _targets(data),
        "notes": notes + busy_note(env) + _method_notes(),
        "data": data,
        "seconds": time.perf_counter() - started,
    }


# ---- report --------------------------------------------------------------------------------------------


def _per_block(data: dict) -> dict:
    """CPU-per-thread data of a BLOCKS-block job, less the same job without blocks, per block."""
    base = {r["group"]: r["cpu_ms_per_call"] for r in data["cpu_no_blocks"]["groups"]}
    groups = {r["group"]: r for r in data["cpu"]["groups"]}
    rows = [{"group": g, "side": r["side"], "cpu_ms_per_call": (r["cpu_ms_per_call"] - base.get(g, 0.0)) / BLOCKS}
            for g, r in groups.items()]
    return {"calls": data["cpu"]["calls"], "groups": sorted(rows, key=lambda r: -r["cpu_ms_per_call"]),
            "process_cpu_ms_per_call": (data["cpu"]["process_cpu_ms_per_call"]
                                        - data["cpu_no_blocks"]["process_cpu_ms_per_call"]) / BLOCKS,
            "wall_ms_per_call": (data["cpu"]["wall_ms_per_call"] - data["cpu_no_blocks"]["wall_ms_per_call"]) / BLOCKS}


def _tables(d: dict) -> list[dict]:
    rt = d["round_trip"]
    rows = [
        ["one local() block, 4-float tensor each way (client stamps)", ms(rt["p50_ms"]), ms(rt["p90_ms"]),
         ms(rt["p99_ms"]), str(rt["n"])],
        [f"the same from whole jobs: ({BLOCKS}-block job - same job without blocks) / {BLOCKS}",
         ms(rt["per_block_from_jobs_ms"]), ms(rt["per_block_from_jobs_p90_ms"]), "", str(rt["reps"])],
    ]
    rows += [[BARE_LABELS[k], ms(v["p50_ms"]), "", ms(v["p99_ms"]), str(v["n"])] for k, v in d["bare"].items()]
    tables = [{
        "title": (f"1. round trip of one local() block on loopback ({rt['reps']} interleaved repetitions; a "
                  f"{BLOCKS}-block job takes {ms(rt['job_ms'])} ms, without the blocks {ms(rt['no_blocks_job_ms'])} ms)"),
        "columns": ["what", "p50 ms", "p90 ms", "p99 ms", "n"],
        "rows": rows,
    }]
    g = d["generation"]
    labels = {"local": "local generation (no server)", "remote": "remote generation",
              "remote_block": "remote generation, local() block every step",
              "remote_answered_block": "the same, and the job reads a value the block binds"}
    rows = [[labels[k], ms(c["p50_ms"]), ms(c["p99_ms"]), ms(c["per_token_ms"]),
             ms(c.get("over_local_per_token_ms", 0.0)) if k != "local" else "-", str(c["n"])]
            for k, c in g["cases"].items()]
    rows.append(["local() block, per token: (with - without) / 32, paired", "", "",
                 f"{ms(g['block_per_token_ms'])} (p10 {ms(g['block_per_token_p10_ms'])}, "
                 f"p90 {ms(g['block_per_token_p90_ms'])})", "", ""])
    rows.append(["a block whose value the job reads, per token: (with - without) / 32, paired", "", "",
                 f"{ms(g['answered_block_per_token_ms'])} (p90 {ms(g['answered_block_per_token_p90_ms'])})", "", ""])
    rows.append(["step to step on the client, with the block (stamps)", ms(g["step_interval_p50_ms"]),
                 ms(g["step_interval_p99_ms"]), "", "", ""])
    tables.append({
        "title": f"2. {NEW_TOKENS}-token greedy generation ({g['reps']} interleaved repetitions)",
        "columns": ["case", "p50 ms", "p99 ms", "per token ms", "over local, per token ms", "n"],
        "rows": rows,
    })
    if "cpu" in d:
        tables.append(cpu_table(f"CPU per local() block by thread ({BLOCKS}-block job less the job without blocks, "
                                f"/ {BLOCKS})", _per_block(d)))
    if "steps" in d:
        st = d["steps"]
        rows = [[r["label"], f"{r['calls_per_call'] / BLOCKS:.2f}", ms(r["ms_per_call"] / BLOCKS)]
                for r in st["steps"] if r["calls_per_call"]]
        rows.append(["whole job / blocks, wall", "", ms(st["wall_ms_per_call"] / BLOCKS)])
        tables.append({"title": (f"steps of a local() call ({st['calls']} jobs of {BLOCKS} blocks; wrapped timers, "
                                 "no profiler; inclusive wall time per block)"),
                       "columns": ["step", "calls/block", "ms/block"], "rows": rows})
    if "profile" in d:
        tables += profile_tables(f"{BLOCKS}-block remote job", d["profile"])
    return tables


def _targets(d: dict) -> list[dict]:
    rt, g = d["round_trip"], d["generation"]
    bidi = d["bare"].get("bidi", {}).get("p50_ms", float("nan"))
    return [
        {"key": "round_trip", "name": "one local() block round trip, p50",
         "value": rt["p50_ms"], "limit": ROUND_TRIP_TARGET_MS, "ok": rt["p50_ms"] <= ROUND_TRIP_TARGET_MS,
         "text": f"{ms(rt['p50_ms'])} ms (p99 {ms(rt['p99_ms'])} ms; bare gRPC bidi {ms(bidi)} ms)"},
        {"key": "per_token", "name": f"local() block per generated token ({NEW_TOKENS}-token generation)",
         "value": g["block_per_token_ms"], "limit": PER_TOKEN_TARGET_MS,
         "ok": g["block_per_token_ms"] <= PER_TOKEN_TARGET_MS,
         "text": f"{ms(g['block_per_token_ms'])} ms per token (p90 {ms(g['block_per_token_p90_ms'])} ms)"},
    ]


def _method_notes() -> list[str]:
    return [
        "Interleaved repetitions (each runs every case once, in a fresh random order); per-token and per-block "
        "costs from whole jobs are medians of per-repetition (paired) differences.",
        f"Round trip: `for _ in range({BLOCKS}): with tracer.local(): stamps.append(time.perf_counter()); "
        "x = x + 1` after `x = lm_head.output[0, -1, :4]`; the interval between consecutive stamps is one local "
        "call: the client's answer (x) goes up, the server resumes the loop and sends the next call (x) down, "
        "the client runs the block. The warm-up jobs' intervals are left out.",
        "Bare gRPC bidi: one open stream-stream call echoing 64-byte messages; a round trip = write one, read one. "
        "'grpc.aio from another thread' runs the call on an asyncio loop thread and waits on a future, as "
        "tether's client does.",
        f"Generation: `tracer.all()`, token = lm_head.output[0, -1].argmax(-1) in both remote cases; the block "
        f"reads `int(token)` on the client. Every case generates the same {NEW_TOKENS} tokens (checked), and the "
        "block runs once per token (checked). The job reads nothing the block binds, so it goes on while the "
        "client runs the block (the next call waits for the answer). In the answered case the block also binds "
        "`chosen = token` and the job reads `chosen` after it, so each step waits for the block's answer: a "
        "full round trip per token.",
        "Client and server share one process (and one GIL) on this machine; no torch.no_grad() anywhere (the "
        "server runs jobs with autograd on, so the local cases do too).",
    ]


def main(argv: list[str] | None = None) -> int:
    from .run import main as run_main

    return run_main(["--only", NAME, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
