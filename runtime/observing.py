"""Watching module values without a body: `tracer.cache` and `.source` ask the running Interleaver to call an
observer each time a module runs, after the bodies' edits there. A mixin of Interleaver (it owns the hooks and
the driver greenlet this uses). Imports torch and greenlet only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from greenlet import getcurrent

__all__ = ["Observing"]


class Observing:
    """Interleaver's observers: `observe(module, group, observer)` and the hooks that call them."""

    def observe(self, module: torch.nn.Module, group: str, observer: Callable[[Any], None]) -> None:
        """Call `observer(value)` each time `module` runs in the model's pass, after the bodies' edits there:
        group "fwd" gives its output, "pre" its `(args, kwargs)`. Hooks `module` now; it must not be running."""
        key = (id(module), group)
        observers = self.__dict__.setdefault("_observers", {})
        if key not in observers:
            observers[key] = []
            old = self._handles.pop(key, None)
            if old is not None:
                old.remove()
            if group == "fwd":
                self._handles[key] = module.register_forward_hook(self._observed_forward_hook, prepend=True)
            else:
                self._handles[key] = module.register_forward_pre_hook(self._observed_pre_hook, with_kwargs=True)
        observers[key].append(observer)

    def _observed_forward_hook(self, module, args, output):
        result = self._forward_hook(module, args, output)
        if getcurrent() is self._driver:
            for observer in self._observers[(id(module), "fwd")]:
                observer(output if result is None else result)
        return result

    def _observed_pre_hook(self, module, args, kwargs):
        result = self._pre_hook(module, args, kwargs)
        if getcurrent() is self._driver:
            for observer in self._observers[(id(module), "pre")]:
                observer((args, kwargs) if result is None else result)
        return result
