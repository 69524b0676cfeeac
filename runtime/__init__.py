"""tether's local interleaving engine: runs intervention bodies inside a model's forward pass.

No networking lives here: the client and server packages build on this engine, never the reverse.
"""

from .contexts import local
from .errors import (
    NotInTraceError,
    OutOfOrderError,
    RemoteError,
    TetherError,
    UnsavedValueError,
    ValueNotReachedError,
)
from .model import NNsight
from .saving import save

__all__ = [
    "NNsight",
    "local",
    "save",
    "TetherError",
    "NotInTraceError",
    "OutOfOrderError",
    "RemoteError",
    "UnsavedValueError",
    "ValueNotReachedError",
]
