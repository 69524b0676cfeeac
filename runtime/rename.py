"""`rename=`: extra names for modules, in traces, cache keys and `print(model)`.

A rename dict is resolved once, when the model is wrapped, into a flat table of aliases: where each alias
is bound (its host module) and which module it names. Imports torch and the engine; never client or server.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import TetherError

__all__ = ["Aliases", "resolve", "lookup", "envoy_at", "alias_paths", "declared", "render"]

Aliases = dict[str, dict[str, str]]  # host path ("model.transformer.h.0") -> {alias: path below the host}


def resolve(root: torch.nn.Module, rename: dict | None, declared: dict[str, str] | None = None,
            reserved: set[str] = frozenset()) -> Aliases:
    """The alias table of `rename` ({path or class: alias or aliases}) over `root`'s module tree.

    A path key names a module below any module it resolves from (`"attn"` in every block; `"*"` stands for
    any one child); a class key names the one direct child of that class. Keys that resolve nowhere are
    skipped (one rename may serve several architectures). `declared` adds aliases already resolved, as
    {alias path: native path} in named_modules() form (what a server declares for a hosted model).
    `reserved` are names an alias may not take (the wrapper's own attributes).
    """
    table: Aliases = {}
    named = dict(root.named_modules())
    for host_path, host in named.items():
        for key, aliases in (rename or {}).items():
            found = _named(host, key)
            if len(found) > 1:
                raise TetherError(
                    f"`rename` key {_key_name(key)} matches {len(found)} modules under "
                    f"`{_full(host_path)}` ({', '.join(p for p, _ in found)}): an alias names one module. "
                    "Key them by path instead.")
            if found:
                path = found[0][0]
                for alias in [aliases] if isinstance(aliases, str) else list(aliases):
                    _bind_dotted(table, host, host_path, alias, path, reserved)
    for alias_path, native in (declared or {}).items():
        host_path, _, alias = alias_path.rpartition(".")
        prefix = f"{host_path}." if host_path else ""
        if host_path not in named or not native.startswith(prefix) or native not in named:
            raise TetherError(f"The declared alias {alias_path!r} for {native!r} names no module below its host.")
        _bind(table, named[host_path], host_path, alias, native[len(prefix):], reserved)
    return table


def _key_name(key: Any) -> str:
    return key.__name__ if isinstance(key, type) else repr(key)


def _full(path: str) -> str:
    return f"model.{path}" if path else "model"


def _named(host: torch.nn.Module, key: str | type) -> list[tuple[str, torch.nn.Module]]:
    """The modules below `host` a rename key names, as (path below host, module), each module once."""
    if isinstance(key, type):
        found = [(name, child) for name, child in host.named_children() if isinstance(child, key)]
    else:
        found = [("", host)]
        for part in key.strip(".").split("."):
            step = []
            for path, module in found:
                children = module._modules
                names = list(children) if part == "*" else [part] if part in children else []
                step += [(f"{path}.{n}".lstrip("."), children[n]) for n in names if children[n] is not None]
            found = step
    unique = {id(module): (path, module) for path, module in reversed(found)}
    return list(reversed(unique.values()))


def _bind_dotted(table: Aliases, host: torch.nn.Module, host_path: str, alias: str, path: str,
                 reserved: set[str]) -> None:
    """A dotted alias binds on the module its prefix names: {"attn.c_proj": "attn.o_proj"} binds `o_proj` on
    `attn`, so the prefix must start the key's path."""
    if "." not in alias:
        _bind(table, host, host_path, alias, path, reserved)
        return
    prefix, _, alias = alias.rpartition(".")
    if not path.startswith(prefix + "."):
        raise TetherError(f"`rename` alias {prefix + '.' + alias!r} for {path!r}: a dotted alias binds on the module "
                          "its prefix names, so the prefix must start the key's path (e.g. 'attn.c_proj': "
                          "'attn.o_proj').")
    inner = f"{host_path}.{prefix}" if host_path else prefix
    _bind(table, host.get_submodule(prefix), inner, alias, path[len(prefix) + 1:], reserved)


def _bind(table: Aliases, host: torch.nn.Module, host_path: str, alias: str, path: str,
          reserved: set[str]) -> None:
    if not alias.isidentifier():
        raise TetherError(f"`rename` alias {alias!r} (for {path!r}) is not a valid attribute name; "
                          "give a plain name such as 'layers'.")
    bound = table.setdefault(_full(host_path), {})
    if bound.get(alias) == path or (alias == path):
        return
    if alias in bound:
        why = f"the alias already given to {bound[alias]!r}"
    elif alias in host._modules:
        why = "a child module of that name"
    elif alias in reserved:
        why = f"tether's `{alias}`"
    elif hasattr(host, alias):
        why = "an attribute of the module"
    else:
        why = ""
    if why:
        raise TetherError(f"`rename` alias {alias!r} for {path!r} would hide {why} on `{_full(host_path)}`. "
                          "Pick another alias.")
    bound[alias] = path


def lookup(envoy: Any, name: str) -> Any:
    """The Envoy the alias `name` names from `envoy`, or None when it is no alias there."""
    table = envoy._root.__dict__.get("_aliases")
    if not table:
        return None
    path = table.get(envoy._path, {}).get(name)
    if path is None:
        return None
    node = envoy
    for part in path.split("."):
        node = getattr(node, part)
    return node


def envoy_at(root: Any, path: str) -> Any:
    """The Envoy at a dotted path ("model.transformer.h.0", aliases allowed; the leading "model" optional)."""
    parts = path.split(".")
    if parts and parts[0] == root._path:
        parts = parts[1:]
    node = root
    for part in parts:
        try:
            node = getattr(node, part)
        except AttributeError:
            raise TetherError(f"`{path}` names no module of this model (no `{part}` in `{node._path}`).") from None
    return node


def alias_paths(root: Any) -> dict[str, str]:
    """Every alias as {full alias path: full native path}, e.g. {"model.layers": "model.transformer.h"}."""
    table = root.__dict__.get("_aliases") or {}
    return {f"{host}.{alias}": f"{host}.{path}" for host, bound in table.items() for alias, path in bound.items()}


def declared(root: Any) -> dict[str, str]:
    """The aliases in named_modules() form ({"transformer.h.0.attention": "transformer.h.0.attn"}):
    what a server declares for a hosted model."""
    cut = len(root._path) + 1
    return {alias[cut:]: native[cut:] for alias, native in alias_paths(root).items()}


# ---- print(model) --------------------------------------------------------------------------------------

def render(envoy: Any) -> str:
    """`repr` of the module tree with each module's aliases before its name: `(attention/attn): ...`."""
    table = envoy._root.__dict__.get("_aliases") or {}
    return _render(envoy._module, envoy._path, table)


def _render(module: torch.nn.Module, path: str, table: Aliases) -> str:
    if not any(host == path or host.startswith(path + ".") for host, bound in table.items() if bound):
        return repr(module)  # no alias at or below: the module's own repr (some classes define theirs)
    bound = table.get(path, {})
    by_child: dict[str, list[str]] = {}
    extra: list[tuple[str, str]] = []
    for alias, target in bound.items():
        if target in module._modules:
            by_child.setdefault(target, []).append(alias)
        else:
            extra.append((alias, target))
    children = [(name, child, by_child.get(name, [])) for name, child in module._modules.items() if child is not None]
    children += [(alias, module.get_submodule(target), []) for alias, target in extra]
    lines = [(_label(name, aliases), _render(child, f"{path}.{name}" if name in module._modules
                                             else f"{path}.{dict(extra)[name]}", table))
             for name, child, aliases in children]
    if isinstance(module, torch.nn.ModuleList) and lines:
        lines = _compress(lines)
    extra_repr = module.extra_repr()
    body = (extra_repr.split("\n") if extra_repr else []) + [f"({label}): {_indent(text)}" for label, text in lines]
    head = module._get_name() + "("
    if not body:
        return head + ")"
    if len(body) == 1 and not lines:
        return head + body[0] + ")"
    return head + "\n  " + "\n  ".join(body) + "\n)"


def _label(name: str, aliases: list[str]) -> str:
    return "/".join([*aliases, name])


def _compress(lines: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """ModuleList's repr: runs of identical children as `(0-1): 2 x Block(...)`."""
    out: list[tuple[str, str]] = []
    start = 0
    for i in range(1, len(lines) + 1):
        if i < len(lines) and lines[i][1] == lines[start][1]:
            continue
        count = i - start
        if count == 1:
            out.append(lines[start])
        else:
            out.append((f"{lines[start][0]}-{lines[i - 1][0]}", f"{count} x {lines[start][1]}"))
        start = i
    return out


def _indent(text: str) -> str:
    first, *rest = text.split("\n")
    return "\n".join([first, *("  " + line for line in rest)])
