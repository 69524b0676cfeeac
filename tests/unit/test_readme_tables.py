"""The READMEs of runtime/, client/ and server/ each have a table "Concepts and their one module" that stays
true: every module it names exists, and every module of the folder is named once."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEADING = "## Concepts and their one module"


def _table_modules(readme: pathlib.Path) -> list[str]:
    """The module names in the first column of the table under HEADING, in order."""
    text = readme.read_text()
    assert HEADING in text, f"{readme.relative_to(ROOT)} has no `{HEADING}` table"
    rows = text.split(HEADING, 1)[1].lstrip("\n").split("\n\n", 1)[0].splitlines()
    return [m.group(1) for row in rows if (m := re.match(r"\| `([\w.]+)` \|", row))]


@pytest.mark.parametrize("folder", ["runtime", "client", "server"])
def test_the_concept_table_names_each_module_once(folder):
    named = _table_modules(ROOT / folder / "README.md")
    present = sorted(p.name for p in (ROOT / folder).glob("*.py"))
    assert len(named) == len(set(named)), f"named twice: {sorted(n for n in set(named) if named.count(n) > 1)}"
    assert not set(named) - set(present), f"{folder}/README.md names modules that do not exist"
    assert not set(present) - set(named), f"{folder}/README.md does not name {sorted(set(present) - set(named))}"
