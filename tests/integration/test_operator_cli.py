"""The `tether` command as processes: `tether serve` with per-model devices and dtypes, then the operator's
commands (`models`, `deploy`, `jobs`, `cancel`, `evict`, `--version`) against it, both as the `tether`
script and as `python -m tether`. Waits for the ready line with a timeout; stops the server with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from test_server_cli import _port, _serve  # (pytest puts this directory on sys.path)

from tether import CONFIG, LanguageModel
from tether.client.channel import close_all
from tether.placement_options import Placement
from tether.server.registry import load_model

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "tether"
COMMAND_TIMEOUT = 120.0  # seconds: a fresh process imports torch before it does anything


def _tether(*args: str, module: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tether"] if module or not SCRIPT.exists() else [str(SCRIPT)]
    env = {k: v for k, v in os.environ.items() if k not in ("TETHER_HOST", "TETHER_API_KEY")}
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=ROOT, timeout=COMMAND_TIMEOUT,
                          env=env)


@pytest.fixture(scope="module")
def served():
    """`tether serve --dtype bfloat16 --model tiny=tiny --model net=...:tiny_net --dtype float32`: the first
    --dtype (before any --model) is every model's default, the second applies to `net` only."""
    proc, lines = _serve("--dtype", "bfloat16", "--model", "tiny=tiny", "--model", "net=tether.tiny:tiny_net",
                         "--dtype", "float32", "--port", "0")
    try:
        yield f"127.0.0.1:{_port(proc, lines)}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        close_all()


def test_version():
    done = _tether("--version", module=False)
    assert done.returncode == 0 and done.stdout.strip() == f"tether {version('tether')}", done.stderr


def test_serve_places_each_model_and_a_remote_job_equals_local(served, monkeypatch):
    done = _tether("models", "--host", served)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:6] == ["NAME", "STATE", "REPLICAS", "DEVICE", "DTYPE", "QUEUE"]
    assert [row.split()[:6] for row in rows] == [["net", "ready", "1", "cpu", "float32", "0"],
                                                  ["tiny", "ready", "1", "cpu", "bfloat16", "0"]]
    monkeypatch.setattr(CONFIG.API, "_host", served)
    monkeypatch.setattr(CONFIG.API, "_api_key", None)
    model, tokenizer = load_model("tiny", Placement(dtype=torch.bfloat16))
    local = _logits(LanguageModel(model, tokenizer=tokenizer))
    remote = _logits(LanguageModel("tiny"), remote=True)
    assert remote.dtype == torch.bfloat16 and torch.equal(remote, local)


def _logits(llm: LanguageModel, **options) -> torch.Tensor:
    with llm.trace("The quick brown fox", **options):
        logits = llm.lm_head.output.save()
    return logits


def test_deploy_jobs_cancel_and_evict(served):
    done = _tether("deploy", "--host", served, "small=tether.tiny:tiny_net", "--replicas", "2",
                   "--dtype", "float16", module=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "small: ready (2 replicas, cpu, float16)"
    jobs = _tether("jobs", "--host", served, "--json")
    assert jobs.returncode == 0 and jobs.stdout == "", jobs.stderr  # nothing queued or running
    cancel = _tether("cancel", "--host", served, "no-such-job")
    assert cancel.returncode == 1 and "NOT_FOUND" in cancel.stderr and "tether jobs" in cancel.stderr
    evicted = _tether("evict", "--host", served, "small")
    assert evicted.returncode == 0 and evicted.stdout.strip() == "small: evicted (0 jobs cancelled)", evicted.stderr
