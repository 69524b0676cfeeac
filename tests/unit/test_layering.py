"""Which package may import which, read from every module's source (imports anywhere in a module count,
inside functions too): the engine knows no transport, client and server stay apart, shared code neither."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = {"runtime": "tether.runtime", "client": "tether.client", "server": "tether.server", "tether": "tether"}
TRANSPORT = ("grpc", "grpc_health", "grpc_reflection")

# package -> import prefixes it must not use
FORBIDDEN = {
    "tether.runtime": ("tether.client", "tether.server", *TRANSPORT),
    "tether.client": ("tether.server",),
    "tether.server": ("tether.client",),
    "tether": ("tether.client", "tether.server", *TRANSPORT),  # shared modules; the facade is checked apart
}
# the facade modules, and what each may import beyond its package's rule: nothing else wires the sides together
FACADE_MAY_IMPORT = {
    "tether": ("tether.client",),  # `tether/__init__.py` (LanguageModel, CONFIG) wires the client in
    "tether.cli": ("tether.client", "tether.server"),  # the `tether` command: `serve` and the operator's commands
    "tether.__main__": ("tether.client", "tether.server"),  # `python -m tether`
}


def _modules():
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            yield name, package, path


def _imports(path: pathlib.Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file at `path`, a module of `package`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]  # `from tether import client`
    return out


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


MODULES = list(_modules())


@pytest.mark.parametrize("name,package,path", MODULES, ids=[m[0] for m in MODULES])
def test_imports_respect_the_layers(name, package, path):
    forbidden = FORBIDDEN[package]
    forbidden = tuple(p for p in forbidden if p not in FACADE_MAY_IMPORT.get(name, ()))
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}" for line, module in _imports(path, package)
           if any(_within(module, p) for p in forbidden)]
    assert not bad, "\n".join(bad)


def test_every_package_is_walked():
    assert {package for _, package, _ in MODULES} == set(PACKAGES.values())
    assert set(FACADE_MAY_IMPORT) <= {name for name, _, _ in MODULES}
    assert len(MODULES) > 40


def _package_of(module: str) -> str:
    """The package (of PACKAGES' values) a `tether...` module belongs to."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in PACKAGES.values() else "tether"


@pytest.mark.parametrize("name,package,path", MODULES, ids=[m[0] for m in MODULES])
def test_no_private_name_is_imported_from_another_package(name, package, path):
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("tether."):
            if _package_of(node.module) != package:
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "\n".join(bad)


def _runtime_private_names() -> set[str]:
    """The private attributes runtime objects keep (`self._x = ...`, `object.__setattr__(self, "_x", ...)`)."""
    names = set()
    for path in (ROOT / "runtime").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "__setattr__" \
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                names.add(node.args[1].value)
    return {n for n in names if isinstance(n, str) and n.startswith("_") and not n.startswith("__")}


@pytest.mark.parametrize("folder", ["client", "server"])
def test_client_and_server_code_read_no_private_runtime_attribute(folder):
    """The client uses the runtime's public seams (e.g. `Tracer.remote_request()`, `envoy.path_of`), never the
    fields behind them, so the engine can change its insides without breaking remote runs."""
    private = _runtime_private_names()
    found = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private \
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" \
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in private:
                found.append(f"{path.name}:{node.lineno} getattr(..., {node.args[1].value!r})")
    assert not found, found
