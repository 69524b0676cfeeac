"""Program text registered for tracebacks and `local()` lookups, named by its content and shared by jobs.

"user.py [3f2a9c01d2]" always means the same text, so concurrent jobs never clobber each other's lines and
the engine's caches (parsed blocks, compiled code) serve every job that sends the same program.
"""

from __future__ import annotations

import collections
import hashlib
import linecache
import threading

from tether.caching import bytes_lru_cache
from tether.runtime.capture import compile_source, register_source

__all__ = ["hold", "release", "compiled"]

_lock = threading.Lock()
_users: collections.Counter[str] = collections.Counter()  # guarded by _lock: registered name -> jobs using it


def hold(filename: str, text: str) -> str:
    """Register `text` (already padded to its file's line numbers) for one more job; returns its name."""
    name = f"{filename} [{hashlib.blake2b(text.encode(), digest_size=5).hexdigest()}]"
    with _lock:
        if _users[name] == 0:
            register_source(name, text)
        _users[name] += 1
    return name


def release(name: str) -> None:
    """One job is done with `name`; the text is forgotten when no job uses it."""
    with _lock:
        _users[name] -= 1
        if _users[name] <= 0:
            del _users[name]
            linecache.cache.pop(name, None)


@bytes_lru_cache()
def compiled(text: str, name: str):
    """The code object of a registered text (immutable, so shared by every job that runs it)."""
    return compile_source(text, name, "exec")
