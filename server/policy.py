"""The server's policy: which modules, functions and builtins programs may use, which names values may
refer to, which pickles load. `source_check` applies it to program text.

Owns the allow-lists (one frozen Policy); imports the standard library, tether.v1, tether.safe_pickle and
tether.runtime.errors only. A guard against mistakes and casual abuse, not an OS sandbox: run workers isolated.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tether.caching import bytes_lru_cache
from tether.safe_pickle import DEFAULT_ALLOW_LIST, PickleAllowList, check_loads, safe_loads
from tether.v1 import values_pb2

from .errors import PolicyViolation

if TYPE_CHECKING:
    from .guards import GuardedModule

__all__ = ["ALLOW_HINT", "CLASS_DUNDERS", "DATA_LOADERS", "DEFAULT_POLICY", "LOADER_RULE", "MOVE_HINT", "Policy"]

_DATA_DATASETS = ("Dataset", "IterableDataset", "TensorDataset", "StackDataset", "ConcatDataset", "ChainDataset",
                  "Subset", "random_split")
_DATA_SAMPLERS = ("Sampler", "SequentialSampler", "RandomSampler", "SubsetRandomSampler", "BatchSampler",
                  "WeightedRandomSampler")
DATA_LOADERS = frozenset({"torch.utils.data.DataLoader", "torch.utils.data.dataloader.DataLoader"})
# methods a shipped class may define under a dunder name: construction, calling, the container protocol
CLASS_DUNDERS = frozenset({"__init__", "__call__", "__len__", "__getitem__", "__iter__", "__next__", "__repr__"})

MOVE_HINT = "move it into a `with tether.local():` block to run it on your own machine"
ALLOW_HINT = f"{MOVE_HINT}, or ask the server operator to allow it"
LOADER_RULE = "a DataLoader on the server loads in the job's own thread: leave num_workers at 0"


@dataclass(frozen=True)
class Policy:
    """What the server runs. Module and callable entries are dotted names matched with their sub-names.

    allowed_modules: modules a program may import or reach (by their real __name__).
    allowed_callables: extra dotted names allowed although outside allowed_modules or denied below
        (e.g. "os.path.join"), and bare builtin names to lift from denied_builtins (e.g. "open").
    denied_builtins: builtins a program may not use (unless the client bound a value of that name).
    denied_callables: names refused even inside allowed modules (file and process access, extensions).
    denied_attributes: attribute names refused on any object (frames, raw file access).
    tether_names: the names under `tether` a program may use (its modules stay off-limits).
    pickle_allow: globals a Pickled value may load (see tether.safe_pickle).
    """

    allowed_modules: frozenset[str] = frozenset(
        {"torch", "math", "operator", "collections", "itertools", "functools", "einops", "numpy", "tether"}
    )
    allowed_callables: frozenset[str] = frozenset(
        # torch.utils.data's datasets, samplers and loaders (in-process only: see source_check's num_workers rule)
        {f"torch.utils.data.{n}" for n in (*_DATA_DATASETS, *_DATA_SAMPLERS, "DataLoader", "default_collate")}
        | {f"torch.utils.data.dataset.{n}" for n in _DATA_DATASETS}
        | {f"torch.utils.data.sampler.{n}" for n in _DATA_SAMPLERS}
        | {"torch.utils.data.dataloader.DataLoader"}
    )
    # what a program may reach under `tether`: the names a body uses (tether.save, tether.list, tether.local,
    # its errors); never the package's modules (tether.loading imports and calls anything) or its set-up
    tether_names: frozenset[str] = frozenset(
        {"save", "apply", "local", "trace", "stop", "list", "dict", "tuple", "set", "int", "float", "str", "bool"}
        | {"bytes", "bytearray", "complex", "TetherError", "NotInTraceError", "OutOfOrderError", "RemoteError"}
        | {"UnsavedValueError", "ValueNotReachedError"}
    )
    denied_builtins: frozenset[str] = frozenset(
        {"exec", "eval", "compile", "open", "globals", "locals", "vars", "setattr", "delattr", "breakpoint"}
        | {"input", "help", "exit", "quit", "license", "credits", "copyright"}
    )
    denied_callables: frozenset[str] = frozenset(
        # files, processes, native code
        {"torch.load", "torch.save", "torch.serialization", "torch.hub", "torch.from_file", "torch.storage"}
        | {
            "torch.ops.load_library",
            "torch.classes.load_library",
            "torch.utils",
            "torch.onnx",
            "torch.export",
        }
        | {"torch.jit", "torch.package", "torch.profiler", "torch.autograd.profiler", "torch.ops.import_module"}
        | {"torch.multiprocessing", "torch.distributed", "torch.testing", "torch.fx", "torch.compiler"}
        | {"numpy.load", "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.savetxt"}
        | {"numpy.loadtxt", "numpy.genfromtxt", "numpy.fromfile", "numpy.fromregex", "numpy.memmap"}
        | {"numpy.lib.format", "numpy.lib.npyio", "numpy.ctypeslib", "numpy.DataSource", "numpy.f2py"}
        | {"numpy.testing", "tether.client", "tether.server"}
        # process-wide state shared with other jobs
        | {"torch.set_default_dtype", "torch.set_default_device", "torch.set_default_tensor_type"}
        | {"torch.set_num_threads", "torch.set_num_interop_threads", "torch.library"}
    )
    denied_attributes: frozenset[str] = frozenset(
        # frames and code objects (a way around the dunder rule)
        {"gi_frame", "gi_code", "cr_frame", "cr_code", "ag_frame", "ag_code", "tb_frame", "tb_next"}
        | {"f_globals", "f_locals", "f_builtins", "f_back", "f_code", "co_code"}
        # raw file access on tensors and arrays
        | {"tofile", "from_file", "load_library", "dump", "_set_from_file", "_new_with_file"}
        # a module's hooks, by their dicts (as the register_* methods below)
        | {"_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks"}
        | {"_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"}
        | {"_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"}
        # shared memory: outside the per-job memory limit (which counts a worker's private memory)
        | {"share_memory", "share_memory_", "_share_memory_", "_share_fd_cpu_", "_share_filename_cpu_", "_share_cuda_"}
        | {"_new_shared", "_new_shared_cuda", "_new_shared_fd_cpu", "_new_shared_filename_cpu", "_get_shared_fd"}
        | {"_new_using_fd_cpu", "_new_using_filename_cpu", "_shared_incref", "_shared_decref"}
        # hooks and weights that would outlive the job on a shared model
        | {"register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook"}
        | {"register_full_backward_pre_hook", "register_backward_hook", "load_state_dict"}
        | {f"register_module_{kind}" for kind in ("forward_hook", "forward_pre_hook", "full_backward_hook")}
        | {f"register_module_{kind}" for kind in ("full_backward_pre_hook", "backward_hook")}
    )
    pickle_allow: PickleAllowList = field(default=DEFAULT_ALLOW_LIST)

    def refuses_attribute(self, name: str) -> bool:
        """Whether an attribute of that name may not be read on any object: a dunder, or a denied attribute
        (the source check applies it to what a program spells, guards.py to names built at run time)."""
        return name.startswith("__") or name in self.denied_attributes

    def with_modules(self, names: Iterable[str]) -> Policy:
        """This policy with `names` (top-level or dotted modules) added to allowed_modules: what
        `tether serve --allow-module NAME` does. Denied callables and attributes stay denied."""
        extra = frozenset(n.strip() for n in names if n.strip())
        bad = sorted(n for n in extra if not all(p.isidentifier() for p in n.split(".")))
        if bad:
            raise ValueError(f"not a module name: {', '.join(bad)} (give e.g. `--allow-module json`)")
        return dataclasses.replace(self, allowed_modules=self.allowed_modules | extra)

    # ------------------------------------------------------------------------------------ programs

    def check_reference(self, path: str, *, filename: str = "", line: int = 0) -> None:
        """Raises PolicyViolation unless the module/function/class at dotted `path` may be used."""
        reason = self.path_refusal(path)
        if reason:
            raise PolicyViolation(f"{reason}; {ALLOW_HINT}", line, filename=filename)

    # --------------------------------------------------------------------------- values, for tether.values

    def resolve_reference(self, ref: values_pb2.Reference) -> Any:
        """A resolve_reference for tether.values.from_value that imports only what the policy allows; a module
        comes as the program sees modules (`guarded`)."""
        path = ".".join(filter(None, (ref.module, ref.qualname)))
        self.check_reference(path)
        obj: Any = importlib.import_module(ref.module)
        for part in filter(None, ref.qualname.split(".")):
            obj = getattr(obj, part)
        return self.guarded(obj) if isinstance(obj, types.ModuleType) else obj

    # ------------------------------------------------------------------------------- at run time

    def guarded(self, module: types.ModuleType) -> GuardedModule:
        """`module` as a program on the server uses it (guards.GuardedModule): every attribute read is checked
        like the dotted path it spells from the module's real name, however the program reached the module."""
        from .guards import guarded  # (guards reads this module's hints and rules)

        return guarded(self, module)

    def program_builtins(self) -> dict[str, Any]:
        """The builtins a program runs with on the server (guards.program_builtins)."""
        from .guards import program_builtins

        return program_builtins(self)

    def loads(self, data: bytes, *, persistent_load: Callable[[Any], Any] | None = None) -> Any:
        """An unpickler for tether.values.from_value restricted to pickle_allow."""
        return safe_loads(data, allow=self.pickle_allow, persistent_load=persistent_load)

    def check_loads(self, data: bytes, *, persistent_load: Callable[[Any], Any] | None = None) -> Any:
        """`loads`'s refusals without its cost: no global the pickle names is called (tether.safe_pickle.check_loads)."""
        return check_loads(data, allow=self.pickle_allow, persistent_load=persistent_load)

    # ------------------------------------------------------------------------------------------ names

    def _listed(self, path: str, entries: frozenset[str]) -> bool:
        return any(path == e or path.startswith(e + ".") for e in entries)

    def lifted(self, path: str) -> bool:
        return self._listed(path, self.allowed_callables)

    def path_refusal(self, path: str) -> str:
        """Why dotted `path` (as spelled, e.g. "torch.nn.functional.gelu") is refused; "" if allowed."""
        if self.lifted(path):
            return ""
        parts = path.split(".")
        if not self._listed(parts[0], self.allowed_modules):
            return f"'{path}' is not allowed on the server: module '{parts[0]}' is not on its allow-list"
        if self._listed(path, self.denied_callables):
            return f"'{path}' is not allowed on the server (it reaches files, processes or shared state)"
        if parts[0] == "tether" and len(parts) > 1 and parts[1] not in self.tether_names and (
                path not in _tether_homes(self.tether_names)):
            return (f"'{path}' is not allowed on the server: programs may use tether's "
                    f"{', '.join(sorted(self.tether_names))} only")
        if any(p.startswith("_") for p in parts[1:]):
            return f"'{path}' is not allowed on the server: private names of modules are off-limits"
        if any(p in self.denied_attributes for p in parts[1:]):
            return f"'{path}' is not allowed on the server (it would outlive the job or reach files)"
        return _resolved_refusal(self, path)

    def _module_refusal(self, module: types.ModuleType, spelled: str) -> str:
        name = getattr(module, "__name__", "") or spelled
        if self.lifted(name) or self.lifted(spelled):
            return ""
        if not self._listed(name, self.allowed_modules) or self._listed(name, self.denied_callables):
            return f"'{spelled}' is not allowed on the server: it is the module '{name}'"
        return ""

    def _object_refusal(self, obj: Any, spelled: str) -> str:
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if not isinstance(module, str) or not isinstance(qualname, str) or self.lifted(spelled):
            return ""
        canonical = f"{module}.{qualname}"
        if module == "builtins":  # tether.list is list: as usable as the bare name, unless that is denied
            denied = qualname in self.denied_builtins and not self.lifted(qualname)
            return (
                f"'{spelled}' is not allowed on the server: it is the builtin '{qualname}'" if denied else ""
            )
        if module.startswith("_") and "." not in module:  # a C accelerator: _functools.reduce is functools'
            module = module[1:]
        if not self._listed(module, self.allowed_modules) or self._listed(canonical, self.denied_callables):
            return f"'{spelled}' is not allowed on the server: it is '{canonical}'"
        return ""


@functools.lru_cache(maxsize=8)
def _tether_homes(names: frozenset[str]) -> frozenset[str]:
    """Where the objects behind `tether.<name>` are defined (tether.runtime.saving.save): a client that did
    `from tether import save` sends `save` by that home."""
    import tether

    objects = (getattr(tether, name, None) for name in names)
    return frozenset(f"{obj.__module__}.{obj.__qualname__}" for obj in objects
                     if isinstance(getattr(obj, "__module__", None), str) and obj.__module__.startswith("tether."))


@bytes_lru_cache(1 << 20)  # keyed by the path: a client's long made-up paths must not stay resident
def _resolved_refusal(policy: Policy, path: str) -> str:
    """Walks `path` on the server's own modules: every module reached (torch.os is os!) and the final
    function or class must be allowed by their real names. Unresolvable paths are left to fail at run time."""
    parts = path.split(".")
    try:
        obj: Any = importlib.import_module(parts[0])
    except ImportError:
        return ""
    for i, part in enumerate(parts[1:], start=2):
        spelled = ".".join(parts[:i])
        try:
            obj = getattr(obj, part)
        except AttributeError:
            if not isinstance(obj, types.ModuleType):
                return ""
            try:  # a submodule not imported yet (under an allowed, not denied, name)
                obj = importlib.import_module(f"{obj.__name__}.{part}")
            except ImportError:
                return ""
        if isinstance(obj, types.ModuleType):
            if reason := policy._module_refusal(obj, spelled):
                return reason
        elif isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            return policy._object_refusal(obj, spelled)
        else:
            return ""  # a constant or instance (torch.float32, torch.ops.aten.add): its attributes are data
    if isinstance(obj, types.ModuleType):
        return policy._module_refusal(obj, path)
    return ""


DEFAULT_POLICY = Policy()
