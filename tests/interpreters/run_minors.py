"""Run tests/interpreters under each Python minor pyproject.toml claims, other than the one running this.

Each minor gets a small venv under .cache/interpreters with pytest only (no torch: these tests need none).
Interpreters are found under pyenv or as `python3.X` on PATH; a claimed minor with none is an error.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
VENVS = ROOT / ".cache" / "interpreters"
REQUIREMENTS = ("pytest>=8", "pytest-timeout>=2.3")


def claimed_minors() -> list[str]:
    """The `Programming Language :: Python :: 3.X` classifiers; the lowest must match `requires-python`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    minors = sorted((c.rsplit(" ", 1)[-1] for c in project.get("classifiers", ())
                     if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)), key=lambda v: int(v[2:]))
    lowest = re.fullmatch(r">=\s*(3\.\d+)", project["requires-python"].strip())
    if not minors or lowest is None or lowest.group(1) != minors[0]:
        sys.exit(f"pyproject.toml: requires-python {project['requires-python']!r} and the Python classifiers "
                 f"{minors} disagree; list every supported minor as a classifier, lowest = requires-python.")
    return minors


def interpreter(minor: str) -> str:
    """pyenv's build of `minor` (its PATH shims may not point at it), else `python3.X` on PATH."""
    pyenv = pathlib.Path(os.environ.get("PYENV_ROOT", pathlib.Path.home() / ".pyenv")) / "versions"
    for candidate in sorted(pyenv.glob(f"{minor}.*/bin/python"), reverse=True):
        return str(candidate)
    found = shutil.which(f"python{minor}")
    if found and "/shims/" not in found:
        return found
    sys.exit(f"no Python {minor} found (python{minor} on PATH or pyenv's {pyenv}); tether claims {minor}: "
             f"install it (`pyenv install {minor}`) so its tests can run.")


def venv_python(minor: str) -> pathlib.Path:
    """A venv of `minor` with REQUIREMENTS installed (created once; recreated when they change)."""
    venv = VENVS / minor
    python = venv / "bin" / "python"
    stamp = venv / "tether-requirements.txt"
    if not (python.exists() and stamp.exists() and stamp.read_text() == "\n".join(REQUIREMENTS)):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([interpreter(minor), "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS],
                       check=True)
        stamp.write_text("\n".join(REQUIREMENTS))
    return python


def main() -> int:
    current = f"{sys.version_info[0]}.{sys.version_info[1]}"
    failed = []
    for minor in claimed_minors():
        if minor == current:
            continue  # the main test run covers it
        print(f"tests/interpreters under Python {minor}", flush=True)
        command = [str(venv_python(minor)), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "--confcutdir", str(HERE), str(HERE)]
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            failed.append(minor)
    if failed:
        print(f"tests/interpreters failed under Python {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
