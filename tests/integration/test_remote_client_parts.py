"""The client's parts that need no server: CONFIG, the status display, and models rebuilt from a ModelSpec."""

from __future__ import annotations

import io
import json

import pytest
import torch

from tether import tiny
from tether.client.display import StatusDisplay
from tether.client.spec import module_from_spec
from tether.config import DEFAULT_HOST, Config, config_path
from tether.v1 import models_pb2


@pytest.fixture(autouse=True)
def isolated_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("TETHER_HOST", raising=False)
    monkeypatch.delenv("TETHER_API_KEY", raising=False)


# ---- CONFIG -------------------------------------------------------------------------------------------


def test_host_and_key_precedence_code_then_environment_then_file(tmp_path, monkeypatch):
    config = Config()
    assert config.API.HOST == DEFAULT_HOST and config.API.APIKEY is None
    config.set_default_host("files-host:1")
    config.set_default_api_key("from-file")
    assert config_path() == tmp_path / "tether" / "config.json"
    assert json.loads(config_path().read_text()) == {"host": "files-host:1", "api_key": "from-file"}
    assert config_path().stat().st_mode & 0o077 == 0  # the key is readable by its owner only

    fresh = Config()  # a new process: only the file knows
    assert (fresh.API.HOST, fresh.API.APIKEY) == ("files-host:1", "from-file")
    monkeypatch.setenv("TETHER_HOST", "env-host:2")
    monkeypatch.setenv("TETHER_API_KEY", "from-env")
    assert (fresh.API.HOST, fresh.API.APIKEY) == ("env-host:2", "from-env")
    fresh.API.HOST, fresh.API.APIKEY = "code-host:3", "from-code"
    assert (fresh.API.HOST, fresh.API.APIKEY) == ("code-host:3", "from-code")
    with pytest.raises(ValueError, match="non-empty"):
        fresh.set_default_api_key("  ")


# ---- the status display -------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_status_is_one_line_redrawn_in_place():
    term = _Terminal()
    display = StatusDisplay(enabled=True, stream=term)
    for state in ("RECEIVED", "QUEUED", "RUNNING", "COMPLETED"):
        display.update("job1", state)
    display.close()
    out = term.getvalue()
    assert out.count("\r\033[2K") >= 4 and out.count("\n") == 1  # every state over the same line
    assert "job1" in out and out.rstrip().endswith(out.rstrip().split("\r\033[2K")[-1])
    assert "COMPLETED" in out.split("\r\033[2K")[-1]


def test_verbose_keeps_every_state_and_a_large_result_gets_a_bar():
    term = _Terminal()
    display = StatusDisplay(enabled=True, verbose=True, stream=term)
    display.update("job2", "QUEUED", "position 2 in the queue")
    display.update("job2", "RUNNING")
    display.progress(32 << 20, 64 << 20)
    display.update("job2", "COMPLETED")
    display.close()
    lines = [line.split("\r\033[2K")[-1] for line in term.getvalue().split("\n") if line]
    assert [s for s in ("QUEUED", "RUNNING", "DOWNLOADING", "COMPLETED") if any(s in line for line in lines)] == [
        "QUEUED", "RUNNING", "DOWNLOADING", "COMPLETED"]
    assert "32.0/64.0 MiB" in term.getvalue() and " 50%" in term.getvalue()


def test_user_text_without_newline_is_never_drawn_over(capsys):
    term = _Terminal()
    display = StatusDisplay(enabled=True, stream=term)
    display.update("job3", "RUNNING")
    display.pause()
    print("streamed tok", end="")  # a local() block printing tokens as they come
    display.resume()
    drawn = term.getvalue()
    display.update("job3", "RUNNING", "still going")
    assert term.getvalue() == drawn  # no redraw over the partial line
    display.update("job3", "COMPLETED")
    display.close()
    assert term.getvalue()[len(drawn):].startswith("\n")  # the final state goes on a line of its own
    assert capsys.readouterr().out == "streamed tok"


def test_plain_streams_get_the_final_line_only_and_disabled_gets_nothing():
    plain = io.StringIO()
    display = StatusDisplay(enabled=True, stream=plain)
    for state in ("QUEUED", "RUNNING", "ERROR"):
        display.update("job4", state, "boom" if state == "ERROR" else "")
    display.close()
    assert plain.getvalue().count("\n") == 1 and "ERROR" in plain.getvalue() and "boom" in plain.getvalue()
    off = _Terminal()
    display = StatusDisplay(enabled=False, stream=off)
    display.update("job5", "RUNNING")
    display.close()
    assert off.getvalue() == ""


# ---- models from a spec -------------------------------------------------------------------------------


def _spec_of(module: torch.nn.Module, config_json: str = "") -> models_pb2.ModelSpec:
    return models_pb2.ModelSpec(
        modules=[models_pb2.ModuleNode(path=p, class_name=type(m).__name__, class_module=type(m).__module__,
                                       extra_repr=m.extra_repr()) for p, m in module.named_modules()],
        printed=repr(module),
        config_json=config_json,
    )


def test_a_module_without_a_config_becomes_a_printable_indexable_skeleton():
    net = torch.nn.Sequential(tiny.tiny_net(), torch.nn.ModuleList([torch.nn.ReLU(), torch.nn.Linear(2, 3)]))
    skeleton = module_from_spec(_spec_of(net))
    assert repr(skeleton) == repr(net)
    assert len(skeleton[1]) == 2 and repr(skeleton[1][-1]) == repr(net[1][-1])
    assert list(skeleton.parameters()) == []
    with pytest.raises(Exception, match="remote=True"):
        skeleton(torch.zeros(1, 5))


def test_a_hugging_face_config_rebuilds_the_model_on_the_meta_device():
    model, _ = tiny.tiny_gpt2()
    rebuilt = module_from_spec(_spec_of(model, model.config.to_json_string()))
    assert repr(rebuilt) == repr(model)
    assert type(rebuilt) is type(model)
    assert all(p.device.type == "meta" for p in rebuilt.parameters())


def test_a_notebook_gets_one_html_status_updated_in_place(monkeypatch):
    pytest.importorskip("IPython")
    import IPython.display

    from tether.client import display as display_module

    shown, updates = [], []

    class Handle:
        def update(self, obj):
            updates.append(obj.data)

    def fake_display(obj, display_id=False):
        shown.append(obj.data)
        return Handle()

    monkeypatch.setattr(display_module, "_in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display", fake_display)
    display = StatusDisplay(enabled=True)
    for state in ("QUEUED", "RUNNING", "COMPLETED"):
        display.update("job6", state)
    display.close()
    assert len(shown) == 1 and len(updates) == 2
    assert "<pre" in updates[-1] and "COMPLETED" in updates[-1] and "job6" in updates[-1]
