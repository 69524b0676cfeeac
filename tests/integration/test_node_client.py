"""The second-language check: a Node.js client (@grpc/grpc-js + @grpc/proto-loader) against a real server.

`examples/node_client/run_job.js` knows nothing of Python: it lists the models, reads the module tree, sends a
trace program as source text with token ids and a float32 tensor, and decodes the saved tensors from the
chunked JobResult. Its numbers must match the same program run locally with tether.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tether import LanguageModel, tiny

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "node_client" / "run_job.js"
NODE = shutil.which("node")
NODE_MODULES = [ROOT / "node_modules" / "@grpc" / name for name in ("grpc-js", "proto-loader")]
TIMEOUT = 60.0  # seconds for the whole Node run
BODY = (
    "h = model.transformer.h[0].output\n"
    "h[:] = h * x\n"
    "out = model.lm_head.output.save()\n"
    "q = (out * 4).round().save()\n"
)

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not on PATH: install Node.js to run the Node client check"),
    pytest.mark.skipif(
        not all(p.is_dir() for p in NODE_MODULES),
        reason="node_modules/@grpc/grpc-js or @grpc/proto-loader is missing: run `npm install --no-audit "
               "--no-fund` in the repository root (make install does)",
    ),
]


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2(), "net": tiny.tiny_net()}


def run_node(address: str, model: str) -> subprocess.CompletedProcess:
    return subprocess.run([NODE, str(SCRIPT), address, model], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)


def local_trace(token_ids: list[int], x: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The Node client's program, run in this process on a fresh tiny GPT-2 (same seed, same weights)."""
    model, tokenizer = tiny.tiny_gpt2()
    lm = LanguageModel(model, tokenizer=tokenizer)
    with lm.trace(token_ids):
        if x is not None:
            h = lm.transformer.h[0].output
            h[:] = h * x
        out = lm.lm_head.output.save()
        q = (out * 4).round().save()
    return {"out": torch.as_tensor(out).double(), "q": torch.as_tensor(q).double()}


def test_node_client_lists_models_and_runs_a_job(server):
    done = run_node(f"127.0.0.1:{server.port}", "tiny")
    assert done.returncode == 0, f"node client failed (rc {done.returncode}):\n{done.stderr}\n{done.stdout}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got:\n{done.stdout}"
    report = json.loads(lines[0])

    assert report["models"] == ["net", "tiny"]
    assert report["architecture"] == "GPT2LMHeadModel"
    assert report["program"] == BODY  # module paths adapted from GetModel's module tree
    assert report["states"] == ["JOB_STATE_RECEIVED", "JOB_STATE_QUEUED", "JOB_STATE_DISPATCHED",
                                "JOB_STATE_RUNNING", "JOB_STATE_COMPLETED"]

    x = torch.tensor(report["x"], dtype=torch.float32)
    assert x.shape == (64,)
    local = local_trace(report["token_ids"], x)
    out, q = local["out"], local["q"]

    assert report["out_dtype"] == "DATA_TYPE_FLOAT32"
    assert report["out_shape"] == list(out.shape) == [1, len(report["token_ids"]), 512]
    assert report["out_sum"] == pytest.approx(out.sum().item(), rel=1e-4)
    assert report["out_abs_sum"] == pytest.approx(out.abs().sum().item(), rel=1e-4)
    assert report["out_head"] == pytest.approx(out.flatten()[:8].tolist(), rel=1e-4, abs=1e-6)

    # q (small integers) is compressible, so the server sends it as one lz4 block, which the client decodes.
    assert report["q_compression"] == "COMPRESSION_LZ4", "the lz4 path of the Node client went untested"
    assert report["q_shape"] == list(q.shape)
    assert report["q_sum"] == pytest.approx(q.sum().item(), rel=1e-4)
    assert report["q_abs_sum"] == pytest.approx(q.abs().sum().item(), rel=1e-4)

    # The intervention took effect: without `h[:] = h * x` the logits differ.
    plain = local_trace(report["token_ids"], None)["out"]
    assert abs(plain.abs().sum().item() - report["out_abs_sum"]) > 1e-3 * report["out_abs_sum"]


def test_node_client_reports_an_unknown_model(server):
    done = run_node(f"127.0.0.1:{server.port}", "no-such-model")
    assert done.returncode == 1
    assert "GetModel failed: NOT_FOUND" in done.stderr and "no-such-model" in done.stderr, done.stderr
    assert done.stdout == ""
