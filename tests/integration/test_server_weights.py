"""A job that writes into the hosted model's weights fails with a clear error; the server keeps serving."""

from __future__ import annotations

import pytest
import torch

from tether import CONFIG, LanguageModel, RemoteError
from tether.runtime import tiny


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2()}


pytestmark = pytest.mark.usefixtures("client_config")  # every test talks to this module's server


def test_writing_into_weights_fails_the_job_and_the_server_keeps_serving(server):
    CONFIG.APP.DISPLAY = False
    llm = LanguageModel("tiny")
    with pytest.raises(RemoteError, match="weights in place"):
        with llm.trace("hello", remote=True):
            with torch.no_grad():
                llm.transformer.h[0].mlp.c_fc.weight.mul_(2)
            llm.lm_head.output.save()
    with llm.trace("hello", remote=True):  # the next job runs
        logits = llm.lm_head.output.save()
    assert logits.shape == (1, len(llm.tokenizer("hello")["input_ids"]), llm.tokenizer.vocab_size)
