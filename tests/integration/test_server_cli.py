"""`tether serve` as a process, and `buf curl` against a server through reflection.

The CLI test waits for the one ready line on stdout (with a timeout) and stops the server with SIGTERM.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from tether import tiny
from tether.server.app import start_server
from tether.v1 import models_pb2, models_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"^tether: serving on 127\.0\.0\.1:(\d+)$")
START_TIMEOUT = 90.0  # seconds: importing torch and building the models in a fresh process


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def _serve(*args: str) -> tuple[subprocess.Popen, queue.Queue]:
    proc = subprocess.Popen([sys.executable, "-m", "tether", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    return proc, lines


def _port(proc: subprocess.Popen, lines: queue.Queue) -> str:
    """The port `tether serve` printed in its ready line (its stderr, if it stopped first)."""
    line = lines.get(timeout=START_TIMEOUT)
    assert line is not None, proc.stderr.read()
    match = READY.match(line.rstrip("\n"))
    assert match, line
    return match.group(1)


def test_tether_serve_prints_its_port_serves_and_stops():
    proc, lines = _serve("--model", "tiny=tiny", "--model", "net=tether.tiny:tiny_net", "--port", "0",
                         "--queue-size", "4", "--job-timeout", "30")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{_port(proc, lines)}") as channel:
            listed = models_pb2_grpc.ModelServiceStub(channel).ListModels(models_pb2.ListModelsRequest(), timeout=30)
        assert [(m.name, m.architecture) for m in listed.models] == [("net", "Sequential"),
                                                                       ("tiny", "GPT2LMHeadModel")]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert lines.get(timeout=5) is None  # nothing else on stdout: exactly one line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tether_serve_reports_a_bad_model_spec():
    proc = subprocess.run([sys.executable, "-m", "tether", "serve", "--model", "x=no_such_module:build"],
                          capture_output=True, text=True, cwd=ROOT, timeout=START_TIMEOUT)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "cannot load model x=no_such_module:build" in proc.stderr and "module:function" in proc.stderr


def _buf() -> list[str] | None:
    local = ROOT / "node_modules" / ".bin" / "buf"
    if local.exists():
        return [str(local)]
    if shutil.which("buf"):
        return ["buf"]
    return None


def test_buf_curl_lists_services_and_calls_through_reflection():
    buf = _buf()
    if buf is None:
        pytest.skip("buf is not installed: run `npm install` (package.json's @bufbuild/buf) to enable this test")
    handle = start_server({"tiny": tiny.tiny_gpt2()})
    try:
        url = f"http://127.0.0.1:{handle.port}"
        flags = ["curl", "--protocol", "grpc", "--http2-prior-knowledge"]
        env = {**os.environ, "BUF_CACHE_DIR": str(ROOT / ".cache" / "buf")}
        listed = subprocess.run([*buf, *flags, "--list-services", url], capture_output=True, text=True,
                                timeout=60, env=env)
        assert listed.returncode == 0, listed.stderr
        services = listed.stdout.split()
        for name in ("tether.v1.JobService", "tether.v1.ModelService", "grpc.health.v1.Health"):
            assert name in services
        called = subprocess.run([*buf, *flags, f"{url}/tether.v1.ModelService/ListModels"], capture_output=True,
                                text=True, timeout=60, env=env)
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout)["models"][0]["name"] == "tiny"
        health = subprocess.run([*buf, *flags, f"{url}/grpc.health.v1.Health/Check"], capture_output=True,
                                text=True, timeout=60, env=env)
        assert json.loads(health.stdout) == {"status": "SERVING"}
    finally:
        handle.stop(grace=0)
