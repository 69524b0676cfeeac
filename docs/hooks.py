"""mkdocs hooks: lay the sources out as the installed package (`tether.runtime` is `runtime/`...) for
mkdocstrings, and put `tether serve --help` (from the real parser) where a page asks for it."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {"runtime": "runtime", "client": "client", "server": "server", "v1": "proto/tether/v1"}  # as pyproject


def on_startup(**_) -> None:
    """.cache/docs-src/tether: links to tether/'s files, and its subpackages where pyproject puts them."""
    package = ROOT / ".cache" / "docs-src" / "tether"
    shutil.rmtree(package.parent, ignore_errors=True)
    package.mkdir(parents=True)
    for path in (ROOT / "tether").iterdir():
        if path.suffix in (".py", ".typed"):
            (package / path.name).symlink_to(path)
    for name, source in LAYOUT.items():
        (package / name).symlink_to(ROOT / source, target_is_directory=True)


MARKER = "<!-- tether serve --help -->"


def on_page_markdown(markdown: str, **_) -> str:
    if MARKER not in markdown:
        return markdown
    from tether.cli import parse_args

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        parse_args(["serve", "--help"])
    return markdown.replace(MARKER, "```text\n" + out.getvalue().replace("usage: tether", "tether") + "```")
