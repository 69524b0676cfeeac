"""Small pieces a new user meets first: readable stand-ins, byte sizes, completion lists, packaging."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import tether
from tether import tiny
from tether.cli import parse_args
from tether.client.events import AwaitedValue, PendingValue
from tether.runtime.saving import NotReached, UnsavedValue
from tether.sizes import format_bytes, parse_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value, says", [
    (UnsavedValue("h"), ["'h'", "not saved", ".save()"]),
    (NotReached("h", "the trace was stopped early"), ["'h'", "never set", "stopped early"]),
    (PendingValue("h", "job 0123 is QUEUED"), ["'h'", "job 0123", "backend=tracer.backend", "result()"]),
    (AwaitedValue("h", "the job runs when you `await` its AsyncBackend"), ["'h'", "await backend"]),
])
def test_stand_ins_have_a_readable_repr_and_raise_only_when_used(value, says):
    text = repr(value)
    assert text.startswith(f"<{type(value).__name__} 'h': ")
    assert all(s in text for s in says), text
    assert getattr(value, "_repr_html_", None) is None  # IPython's probes see "no such attribute"
    with pytest.raises(tether.TetherError):
        value + 1
    with pytest.raises(tether.TetherError):
        str(value)


def test_sizes_parse_and_print_as_people_write_them():
    assert parse_bytes("1GiB") == 1 << 30 and parse_bytes("512 MiB") == 512 << 20 and parse_bytes("2GB") == 2e9
    assert parse_bytes("1073741824") == 1 << 30
    with pytest.raises(ValueError, match="1GiB"):
        parse_bytes("lots")
    assert format_bytes(188743720) == "180.0 MiB" and format_bytes(512) == "512 bytes"
    assert parse_args(["serve", "--model", "t=tiny", "--max-result-bytes", "1GiB"]).max_result_bytes == 1 << 30
    assert parse_args(["serve", "--model", "t=tiny", "--log-level", "debug"]).log_level == "DEBUG"


def test_dir_lists_children_and_tether_attributes():
    net = tether.NNsight(tiny.tiny_net())
    assert {"layer1", "layer2", "trace", "output", "input", "next", "all"} <= set(dir(net))
    model, tok = tiny.tiny_gpt2()
    llm = tether.LanguageModel(model, tokenizer=tok)
    assert {"mlp", "attn", "output", "inputs"} <= set(dir(llm.transformer.h[0]))
    assert {"generate", "tokenizer", "transformer", "lm_head"} <= set(dir(llm))


def test_jedi_completes_submodules_of_a_live_model():
    jedi = pytest.importorskip("jedi")
    model, tok = tiny.tiny_gpt2()
    llm = tether.LanguageModel(model, tokenizer=tok)
    names = lambda code: {c.name for c in jedi.Interpreter(code, [{"llm": llm}]).complete()}  # noqa: E731
    assert "transformer" in names("llm.trans")
    assert {"h", "wte"} <= names("llm.transformer.")
    indexed = names("llm.transformer.h[0].")  # jedi indexes the live ModuleList: the block's own children
    assert {"output", "input", "next", "mlp", "attn", "ln_1"} <= indexed and "append" not in indexed
    assert {"c_fc", "c_proj"} <= names("llm.transformer.h[-1].mlp.c_")
    assert "mlp" in names("llm.transformer.h[1].ml")


def test_the_package_is_typed():
    assert (ROOT / "tether" / "py.typed").is_file()
    assert '"tether" = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


def _public_callables():
    """The user-facing API: constructors users call, and the methods they use."""
    from tether.client.aio import AsyncBackend, fetch
    from tether.client.runner import RemoteBackend
    from tether.config import Config
    from tether.runtime.envoy import Envoy
    from tether.runtime.language_model import LanguageModel
    from tether.runtime.model import NNsight
    from tether.runtime.tracer import Tracer
    from tether.server.policy import Policy

    constructed = (NNsight, LanguageModel, RemoteBackend, AsyncBackend)
    for cls in (*constructed, Tracer, Envoy, Config):
        for name, member in vars(cls).items():
            if callable(member) and (not name.startswith("_") or (name == "__init__" and cls in constructed)):
                yield f"{cls.__name__}.{name}", cls, member
    yield "Policy.with_modules", Policy, Policy.with_modules
    yield "fetch", None, fetch


@pytest.mark.parametrize("name, cls, function", list(_public_callables()),
                         ids=[n for n, _, _ in _public_callables()])
def test_every_public_method_documents_its_keywords(name, cls, function):
    import inspect

    doc = inspect.getdoc(function) or ""
    if name.endswith("__init__"):
        doc += inspect.getdoc(cls) or ""
    assert doc, f"{name} has no docstring"
    params = [p for p in inspect.signature(function).parameters.values() if p.name not in ("self", "cls")]
    missing = [p.name for p in params if p.default is not p.empty and p.name not in doc]
    assert not missing, f"{name}'s docstring does not mention {missing}"


def test_help_of_trace_names_the_remote_keywords():
    text = tether.NNsight.trace.__doc__
    assert all(k in text for k in ("remote", "backend", "blocking", "api_key"))


# ---- 10. messages that name the user's line and the fix ------------------------------------------------


def test_a_trace_without_input_says_so():
    net = tether.NNsight(tiny.tiny_net())
    with pytest.raises(tether.NotInTraceError, match=r"trace that has no input.*model.trace\(x\)"):
        with net.trace():
            net.layer1.output.save()


def test_grad_asked_after_backward_names_the_variable_and_the_order():
    net = tether.NNsight(tiny.tiny_net())
    x = torch.rand(1, 5, requires_grad=True)
    with net.trace(x):
        h = net.layer1.output
        net.output.sum().backward()
        g = h.grad.save()
    assert "`g` is a gradient" in repr(g) and "loss.backward()" in repr(g)
    with pytest.raises(tether.ValueNotReachedError, match="`g` is a gradient that no backward pass computed"):
        g + 1
    with net.trace(x):  # the order it asks for works, and matches plain torch
        h = net.layer1.output
        g = h.grad.save()
        net.output.sum().backward()
    plain = tiny.tiny_net()
    hidden = plain.layer1(x)
    hidden.retain_grad()
    plain.layer2(hidden).sum().backward()
    assert torch.equal(g, hidden.grad)


def test_a_wrongly_shaped_set_names_the_users_line_and_no_tether_frame_shows():
    net = tether.NNsight(tiny.tiny_net())
    with pytest.raises(RuntimeError) as info:
        with net.trace(torch.rand(1, 5)):
            net.layer1.output = torch.zeros(3, 7)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "`model.layer1.output = ...` (shape (3, 7))" in notes and f"{__file__}, line" in notes
    own = [str(ROOT / d) for d in ("runtime", "client", "server", "tether")]
    frames = [f.filename for f in traceback.extract_tb(info.value.__traceback__)]
    assert not [f for f in frames if any(f.startswith(d) for d in own)]
    assert frames[0] == __file__  # the `with` line, then the model's frames: the error's own traceback


def test_plain_python_shows_the_with_line_then_the_users_failing_line_and_no_tether_frame(tmp_path):
    """Plain Python (no IPython or pytest to hide frames): the traceback of a body's error is the `with` line
    and then the failing line, as if the body had run in place (runtime/README.md, "Tracebacks")."""
    script = tmp_path / "user.py"
    script.write_text("import torch\nimport tether\nfrom tether import tiny\n"
                      "net = tether.NNsight(tiny.tiny_net())\n"
                      "def work():\n"
                      "    with net.trace(torch.rand(1, 5)):\n"
                      "        h = net.layer1.output\n"
                      "        y = h[100]\n"
                      "work()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n    (.*)', done.stderr)
    assert [(Path(f).name, int(n), name) for f, n, name, _ in frames] == [
        ("user.py", 9, "<module>"), ("user.py", 6, "work"), ("user.py", 8, "work")]
    assert frames[-1][3] == "y = h[100]" and done.stderr.rstrip().splitlines()[-1].startswith("IndexError")


# ---- 11. the transformers-5 `.output[0]` trap --------------------------------------------------------


def test_output_zero_on_a_batch_of_one_tensor_warns_once(monkeypatch):
    from tether.runtime import batch_index

    monkeypatch.setattr(batch_index, "_warned", False)
    model, tok = tiny.tiny_gpt2()
    llm = tether.LanguageModel(model, tokenizer=tok)
    with pytest.warns(batch_index.BatchIndexWarning, match=r"model.transformer.h.0.output\[0\]` takes row 0") as seen:
        with llm.trace("Hello"):
            first = llm.transformer.h[0].output[0].save()
            again = llm.transformer.h[1].output[0].save()
    assert len(seen) == 1 and seen[0].filename == __file__  # once, at the user's line
    with torch.no_grad():
        hidden = model(**tok("Hello", return_tensors="pt"), output_hidden_states=True).hidden_states
    assert torch.equal(first, hidden[1][0]) and again.shape == (3, 64)  # what [0] really took: batch row 0


def test_no_warning_for_tuples_slices_or_explicit_rows(monkeypatch, recwarn):
    from tether.runtime import batch_index

    monkeypatch.setattr(batch_index, "_warned", False)
    model, tok = tiny.tiny_gpt2()
    llm = tether.LanguageModel(model, tokenizer=tok)
    with llm.trace("Hello"):
        attn = llm.transformer.h[0].attn.output[0].save()  # a tuple: [0] is its first element
        last = llm.transformer.h[0].output[:, -1].save()
        row = llm.transformer.h[1].output[0, ...].save()
    assert not [w for w in recwarn if issubclass(w.category, batch_index.BatchIndexWarning)]
    assert attn.shape == (1, 3, 64) and last.shape == (1, 64) and row.shape == (3, 64)


def test_the_status_line_never_moves_back_and_shows_the_servers_time():
    from tether.client.display import StatusDisplay

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    display = StatusDisplay(enabled=True, stream=stream)
    for state in ("RUNNING", "RECEIVED", "QUEUED"):  # a snapshot older than the events already shown
        display.update("job1", state)
    assert " RUNNING " in re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue()).split("\r\x1b[2K")[-1]
    display.update("job1", "COMPLETED", "result of 180.0 MiB", elapsed=12.34)
    display.close()
    last = re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue()).split("\r\x1b[2K")[-1]
    assert "COMPLETED 12.3s" in last and "180.0 MiB" in last
    assert "RECEIVED" not in re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue())
