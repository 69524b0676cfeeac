"""A least-recently-used cache bounded by bytes: for caches keyed by program text (parsed trees, compiled code).

A cache bounded by entries lets a few large programs stay resident; this one weighs each entry by the text in
its key, nested in tuples and sets too (what its parsed tree or code object scales with). Imports nothing of tether.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["bytes_lru_cache", "DEFAULT_CACHE_BYTES", "recording", "seed"]

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_CACHE_BYTES = 16 << 20  # bytes of key text per cache: ~16 programs of the 1 MiB limit, or thousands of small ones
_recorded = threading.local()  # .calls: the list `recording` notes this thread's cached calls in, if any


def _weight(args: tuple | frozenset | list) -> int:
    """64 bytes an entry, plus the length of every str and bytes in the key, inside its tuples and sets too (a
    key of many short names weighs what they do)."""
    return 64 + sum(len(a) if isinstance(a, (str, bytes)) else _weight(a) if isinstance(a, (tuple, frozenset, list))
                    else 0 for a in args)


def bytes_lru_cache(max_bytes: int = DEFAULT_CACHE_BYTES) -> Callable[[F], F]:
    """Like functools.lru_cache (hashable arguments), but bounded by the total length of the str and
    bytes arguments of the cached calls; a single call heavier than `max_bytes` is computed and not kept."""

    def decorate(fn: F) -> F:
        lock = threading.Lock()
        entries: collections.OrderedDict[tuple, tuple[Any, int]] = collections.OrderedDict()  # guarded by lock
        total = [0]  # guarded by lock: the weights of `entries`

        @functools.wraps(fn)
        def cached(*args, **kwargs):
            key = (*args, *sorted(kwargs.items())) if kwargs else args
            with lock:
                hit = entries.get(key)
                if hit is not None:
                    entries.move_to_end(key)
            if hit is None:
                value = fn(*args, **kwargs)  # outside the lock: a slow call never blocks other keys
                keep(key, value, _weight((*args, *kwargs.values())))
            else:
                value = hit[0]
            calls = getattr(_recorded, "calls", None)
            if calls is not None:
                calls.append((cached, args, kwargs, value))
            return value

        def keep(key: tuple, value: Any, weight: int) -> None:
            if weight > max_bytes:
                return
            with lock:
                if key not in entries:
                    entries[key] = (value, weight)
                    total[0] += weight
                    while total[0] > max_bytes:
                        _, (_, dropped) = entries.popitem(last=False)
                        total[0] -= dropped

        def cache_put(value: Any, *args, **kwargs) -> None:
            """Keep `value` as the result of the call with these arguments (computed elsewhere: `seed`)."""
            keep((*args, *sorted(kwargs.items())) if kwargs else args, value, _weight((*args, *kwargs.values())))

        def cache_clear() -> None:
            with lock:
                entries.clear()
                total[0] = 0

        def cache_bytes() -> int:
            with lock:
                return total[0]

        cached.cache_put = cache_put  # type: ignore[attr-defined]
        cached.cache_clear = cache_clear  # type: ignore[attr-defined]
        cached.cache_bytes = cache_bytes  # type: ignore[attr-defined]
        return cached  # type: ignore[return-value]

    return decorate


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[Callable, tuple, dict, Any]]]:
    """Within it, every call of a bytes_lru_cache function in this thread (hit or computed) is noted as
    (function, args, kwargs, value): work done in one process that another seeds its caches with (`seed`)."""
    calls: list[tuple[Callable, tuple, dict, Any]] = []
    outer = getattr(_recorded, "calls", None)
    _recorded.calls = calls
    try:
        yield calls
    finally:
        _recorded.calls = outer


def seed(calls: list[tuple[Callable, tuple, dict, Any]]) -> None:
    """Keep the results of calls `recording` noted (in this process or another) in their functions' caches."""
    for fn, args, kwargs, value in calls:
        fn.cache_put(value, *args, **kwargs)
