"""tether in a real Jupyter kernel (nbclient): the live status line, readable stand-ins, no widget warning.

The notebook starts a loopback server (OS-assigned port) inside the kernel and runs a remote generation;
every display message the kernel sends is recorded, so the test sees the status line tick.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from nbclient.util import run_sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CELLS = [
    """\
import tether
from tether import CONFIG, LanguageModel
from tether import tiny
from tether.server.app import start_server
server = start_server({"tiny": tiny.tiny_gpt2()}, "127.0.0.1", 0)
CONFIG.API.HOST = server.address
llm = LanguageModel("tiny")""",
    """\
import time
with llm.generate("Hello", max_new_tokens=24, remote=True):
    first = llm.lm_head.output
    with tether.local():  # a job that lasts: the status line must tick while it runs
        time.sleep(0.5)
    tokens = llm.generator.output.save()
tokens.shape[1] - len(llm.tokenizer("Hello")["input_ids"])""",
    """\
with llm.trace("Hello", remote=True, blocking=False) as tracer:
    logits = llm.output.logits.save()
logits""",
    """\
with llm.trace("Hello"):
    broken = llm.transformer.h[0].output[0, 0, 10_000]""",
    """\
from tqdm.auto import tqdm
for _ in tqdm(range(3)):
    pass
server.stop(grace=0)""",
]  # the kernel keeps `llm` after the server stops: the completion requests below use it


TRUST_TETHER = """\
%config IPCompleter.use_jedi = False
%config IPCompleter.policy_overrides = {"allowed_getattr_external": {"tether", ("pandas", "DataFrame"), ("pandas", "Series")}, "allowed_getitem_external": {"tether", ("numpy", "ndarray"), ("numpy", "void")}}
print(f"evaluation = {get_ipython().Completer.evaluation!r}")"""  # the opt-in docs/reference/tracing.md gives


class _Recording(nbclient.NotebookClient):
    """Keeps every message the kernel sends for a cell (display updates included)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messages: list[dict] = []

    def process_message(self, msg, cell, cell_index):
        self.messages.append((cell_index, msg))
        return super().process_message(msg, cell, cell_index)


def _complete(client, code: str) -> list[str]:
    """The kernel's completions at the end of `code` (a complete_request, as Jupyter sends on Tab)."""

    async def ask():
        return await client.kc.complete(code, len(code), reply=True, timeout=30)

    return run_sync(ask)()["content"]["matches"]


def _texts(outputs, mime: str) -> list[str]:
    return [o.get("data", {}).get(mime, "") for o in outputs] + [o.get("text", "") for o in outputs]


def test_a_notebook_shows_a_live_status_line_and_readable_pending_values(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    client = _Recording(nb, timeout=120, kernel_name="python3", allow_errors=True, resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        complete = functools.partial(_complete, client)
        assert "transformer" in complete("llm.trans")  # Jupyter's completion (jedi) sees the children
        assert {"output", "input", "next"} <= set(complete("llm.transformer.h[0]."))
        assert "mlp" in " ".join(complete("llm.transformer.h[0].ml"))  # past an index, with the defaults
        assert "c_fc" in " ".join(complete("llm.transformer.h[-1].mlp.c_"))
        nb.cells.append(nbformat.v4.new_code_cell(TRUST_TETHER))
        client.execute_cell(nb.cells[-1], len(nb.cells) - 1)
        assert "evaluation = 'limited'" in " ".join(_texts(nb.cells[-1].outputs, "text/plain"))
        assert ".mlp" in complete("llm.transformer.h[0].ml")  # IPython's own evaluator, trusting tether's types (docs)
        assert ".c_fc" in complete("llm.transformer.h[-1].mlp.c_")
    generation = nb.cells[1].outputs
    assert "24" in _texts(generation, "text/plain")  # tokens generated
    html = [m["content"]["data"]["text/html"] for i, m in client.messages
            if i == 1 and m["msg_type"] in ("display_data", "update_display_data")]
    assert any(re.search(r"step \d+/24", h) for h in html)
    assert "COMPLETED" in html[-1]
    running = {re.search(r"RUNNING (\d+\.\d)s", h).group(1) for h in html if "RUNNING" in h}
    assert len(running) >= 2  # the clock moves while the job runs
    pending = " ".join(_texts(nb.cells[2].outputs, "text/plain"))
    assert "PendingValue 'logits'" in pending and "backend=tracer.backend" in pending
    errors = [o for i, c in enumerate(nb.cells) for o in c.outputs if o.get("output_type") == "error"]
    assert len(errors) == 1 and errors[0]["ename"] == "IndexError"  # the cell that indexes out of range
    shown = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(errors[0]["traceback"]))
    assert "output[0, 0, 10_000]" in shown  # the user's line...
    own = [str(ROOT / d) for d in ("runtime", "client", "server", "tether")]
    assert not any(d in shown for d in own), shown  # ...and no frame of tether's own
    everything = " ".join(" ".join(_texts(c.outputs, "text/plain")) for c in nb.cells)
    assert "IProgress not found" not in everything
