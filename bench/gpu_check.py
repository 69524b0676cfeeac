"""`python -m bench.gpu_check`: SmolLM2 on a GPU, run locally and through a loopback `tether serve --device
cuda:0`, compared bit for bit, with timings (not part of `make bench`; run it on a CUDA machine).

For each dtype (default bfloat16 and float32) it checks, remote against local on the same GPU: a trace's
saved hidden state and logits, greedy generation's tokens, and a `local()` block whose answer goes back
into the model. Then it times a trace and a 32-token generation (medians, interleaved). Without CUDA it
says so and runs everything on the CPU (a dry run of the script, not GPU numbers). Exit status 1 if any
comparison differs. `--out FILE` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, here and in the server

import torch  # noqa: E402

import tether  # noqa: E402
from tether import CONFIG, LanguageModel  # noqa: E402
from tether.placement_options import Placement  # noqa: E402
from tether.server.registry import load_model  # noqa: E402

PROMPT = "The Eiffel Tower is in the city of"
START_TIMEOUT = 600.0  # s: the server loads SmolLM2 once per dtype (the first load also converts the GGUF)


def _serve(device: str, dtypes: list[str]) -> tuple[subprocess.Popen, str]:
    """`tether serve` in a child process with one SmolLM2 per dtype on `device`; (process, address)."""
    args = [sys.executable, "-m", "tether", "serve", "--device", device]
    for dtype in dtypes:
        args += ["--model", f"smollm2_{dtype}=smollm2", "--dtype", dtype]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for out in proc.stdout:
            lines.put(out)
        lines.put(None)

    threading.Thread(target=read, name="gpu-check-serve-stdout", daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT)
    except queue.Empty:
        line = None
    if not line or not line.startswith("tether: serving on "):
        proc.kill()
        raise SystemExit(f"tether serve did not start (got {line!r}); see its stderr above")
    return proc, line.removeprefix("tether: serving on ").strip()


def _trace(model: LanguageModel, **options) -> tuple[torch.Tensor, torch.Tensor]:
    with model.trace(PROMPT, **options):
        hidden = model.model.layers[15].output.save()
        logits = model.lm_head.output.save()
    return hidden, logits


def _generate(model: LanguageModel, tokens: int, **options) -> torch.Tensor:
    with model.generate(PROMPT, max_new_tokens=tokens, do_sample=False, **options):
        out = model.generator.output.save()
    return out


def _local_block(model: LanguageModel, **options) -> torch.Tensor:
    with model.trace(PROMPT, **options):
        hidden = model.model.layers[3].output
        with tether.local():
            scaled = hidden * 0.5  # on the client when remote: comes back to the GPU
        model.model.layers[3].output = scaled
        logits = model.lm_head.output.save()
    return logits


def _compare(name: str, remote: torch.Tensor, local: torch.Tensor) -> dict[str, Any]:
    local_cpu = local.detach().cpu()
    equal = remote.dtype == local_cpu.dtype and remote.shape == local_cpu.shape and torch.equal(remote, local_cpu)
    row = {"check": name, "equal": bool(equal), "remote_device": str(remote.device), "dtype": str(remote.dtype)}
    if not equal and remote.shape == local_cpu.shape:
        row["max_abs_diff"] = float((remote.double() - local_cpu.double()).abs().max())
    return row


def _median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def check(device: str, dtype: str, repeats: int, tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    model, tokenizer = load_model("smollm2", Placement(device=device, dtype=getattr(torch, dtype)))
    local = LanguageModel(model, tokenizer=tokenizer)
    load_s = time.perf_counter() - started
    remote = LanguageModel(f"smollm2_{dtype}")
    rows = [_compare(f"trace {n}", r, loc) for n, r, loc in zip(("hidden", "logits"), _trace(remote, remote=True),
                                                                 _trace(local))]
    rows.append(_compare(f"generate {tokens} tokens", _generate(remote, tokens, remote=True), _generate(local, tokens)))
    rows.append(_compare("local() block answer", _local_block(remote, remote=True), _local_block(local)))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    timings = {}
    for label, local_run, remote_run in (
        ("trace_ms", lambda: (_trace(local), sync()), lambda: _trace(remote, remote=True)),
        (f"generate_{tokens}_ms", lambda: (_generate(local, tokens), sync()), lambda: _generate(remote, tokens, remote=True)),
    ):
        timings[label] = {"local": _median_ms(local_run, repeats), "remote": _median_ms(remote_run, repeats)}
    return {"dtype": dtype, "device": device, "local_load_s": round(load_s, 2), "checks": rows, "timings": timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated (default bfloat16,float32)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per case (median)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per timed generation")
    parser.add_argument("--out", help="also write the figures as JSON to this file")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        device = "cuda:0"
        where = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        device, where = "cpu", "the CPU"
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): running on the CPU instead. "
              "The equality checks still run; the timings are NOT GPU numbers.", file=sys.stderr)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    proc, address = _serve(device, dtypes)
    CONFIG.API.HOST = address
    try:
        results = [check(device, dtype, args.repeats, args.tokens) for dtype in dtypes]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    report = {"device": where, "torch": torch.__version__, "python": platform.python_version(), "results": results}
    ok = all(row["equal"] for result in results for row in result["checks"])
    print(f"# gpu_check on {where}: {'all equal' if ok else 'DIFFERENCES FOUND'}")
    for result in results:
        print(f"\n## {result['dtype']} on {result['device']} (local load {result['local_load_s']} s)")
        for row in result["checks"]:
            extra = f" (max |diff| {row['max_abs_diff']:.3g})" if "max_abs_diff" in row else ""
            print(f"- {row['check']}: {'equal' if row['equal'] else 'DIFFERENT'}{extra}")
        for label, t in result["timings"].items():
            print(f"- {label}: local {t['local']:.2f}, remote {t['remote']:.2f} (+{t['remote'] - t['local']:.2f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
