"""On a real loopback server, a module reached through a name the source check cannot follow is still checked
at run time (Policy.guarded), and the modules a body imports or binds work as they do locally."""

from __future__ import annotations

import grpc
import torch
from test_server import Client, assert_serving, code_of, program, spec

from tether import LanguageModel, tiny
from tether.v1 import jobs_pb2


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2()}


SERVER_OPTIONS = {"max_batch": 1}


def test_a_module_reached_where_the_source_check_cannot_follow_is_checked_when_the_job_runs(client: Client):
    for source, named in [("x = [torch][0]\npid = x.os.getpid()\n", "'torch.os'"),
                          ("t = {'k': tether}['k']\nf = t.loading.load_named\n", "'tether.loading'")]:
        outcome = client.run(spec(program("out = model.lm_head.output.save()\n" + source, "hello")))
        assert outcome.final.state == jobs_pb2.JOB_STATE_ERROR, outcome.final
        assert named in outcome.final.message and "not allowed on the server" in outcome.final.message
    code, details = code_of(lambda: client.submit(spec(program("x = torch\npid = x.os.getpid()\n", "hello"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'torch.os'" in details, details  # (an alias it follows)
    assert_serving(client)


def test_modules_a_body_imports_and_binds_work_as_locally(client_config):
    import torch.nn.functional as F

    local_model, tokenizer = tiny.tiny_gpt2()
    local = LanguageModel(local_model, tokenizer=tokenizer)
    remote = LanguageModel("tiny")

    def body(lm, **options):
        with lm.trace("hello", **options):
            import math

            from torch import nn
            scale = math.sqrt(4.0)
            hidden = F.gelu(lm.lm_head.output * scale).save()
            kind = nn.Linear
            mod = F
        return hidden, kind, mod

    here, there = body(local), body(remote, remote=True)
    assert torch.equal(here[0], there[0]) and there[1] is torch.nn.Linear and there[2] is F
