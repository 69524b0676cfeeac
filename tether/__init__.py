"""tether: read and write any module's inputs, outputs and gradients mid-forward-pass, locally or remotely.

`from tether import NNsight, LanguageModel, CONFIG` — the nnsight walkthrough's API, name for name.
"""

from tether.runtime.compat import (
    apply,
    bool,
    bytearray,
    bytes,
    complex,
    dict,
    float,
    int,
    list,
    set,
    stop,
    str,
    trace,
    tuple,
)
from tether.runtime.contexts import local
from tether.runtime.errors import (
    NotInTraceError,
    OutOfOrderError,
    RemoteError,
    TetherError,
    UnsavedValueError,
    ValueNotReachedError,
)
from tether.runtime.model import NNsight
from tether.runtime.remote import set_runner, set_spec_loader
from tether.runtime.saving import save

__all__ = [
    "NNsight",
    "LanguageModel",
    "CONFIG",
    "save",
    "apply",
    "local",
    "trace",
    "stop",
    "list",
    "dict",
    "tuple",
    "set",
    "int",
    "float",
    "str",
    "bool",
    "bytes",
    "bytearray",
    "complex",
    "TetherError",
    "NotInTraceError",
    "OutOfOrderError",
    "RemoteError",
    "UnsavedValueError",
    "ValueNotReachedError",
]


def _run_remote(context, ns):
    from tether.client.runner import run_remote

    return run_remote(context, ns)


def _load_remote_spec(name, host=None, api_key=None):
    from tether.client.spec import load_remote_spec

    return load_remote_spec(name, host=host, api_key=api_key)


set_runner(_run_remote)
set_spec_loader(_load_remote_spec)


def __getattr__(name):
    if name == "LanguageModel":
        from tether.runtime.language_model import LanguageModel

        return LanguageModel
    if name == "CONFIG":
        from tether.config import CONFIG

        return CONFIG
    raise AttributeError(f"module 'tether' has no attribute {name!r}")
