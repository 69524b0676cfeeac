"""A large program is parsed and checked outside the front door's process (server/check_process.py): its
result is the same, a refusal names its line, and the door itself never parses its text."""

from __future__ import annotations

import grpc
import torch
from test_server import Client, assert_serving, code_of, program, spec

from tether import tiny
from tether.server import program_texts
from tether.server.check_process import OFFLOAD_BYTES
from tether.v1 import jobs_pb2


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2()}


def _large(tail: str) -> str:
    """A body of OFFLOAD_BYTES and more: many small statements, then `tail`."""
    filler = "v = 1\n" * (2 * OFFLOAD_BYTES // 6)
    return "h = model.transformer.h[0].output\nout = model.lm_head.output.save()\n" + filler + tail


def test_a_large_program_runs_as_a_small_one_and_the_front_door_never_parses_it(client: Client, monkeypatch):
    parsed: list[int] = []
    original = program_texts.parse

    def counted(source, *args, **kwargs):
        parsed.append(len(source))
        return original(source, *args, **kwargs)

    monkeypatch.setattr(program_texts, "parse", counted)
    small = client.run(spec(program("v = 1\nout = model.lm_head.output.save()\nlast = v + 1\n", "hello")))
    large = client.run(spec(program(_large("last = v + 1\n"), "hello")))
    for outcome in (small, large):
        assert outcome.final.state == jobs_pb2.JOB_STATE_COMPLETED, outcome.final
    assert torch.equal(small.saved()["out"], large.saved()["out"]) and large.saved()["last"] == 2
    assert parsed and max(parsed) < OFFLOAD_BYTES  # the small one was parsed here, the large one elsewhere
    assert_serving(client)


def test_a_large_programs_refusal_names_its_line(client: Client):
    source = _large("import os\n")
    line = 10 + source.count("\n") - 1  # (test_server.program: the body starts at line 10)
    code, details = code_of(lambda: client.submit(spec(program(source, "hello"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"line {line}" in details and "'os'" in details, details
    assert_serving(client)
