"""The `tether` command is a facade (tether/cli.py): `serve` runs the server's code, the operator's commands
the client's; the installed script and `python -m tether` both enter it. No server, no network."""

from __future__ import annotations

import pathlib

import pytest

from tether.cli import parse_args
from tether.client import operator_cli
from tether.server import cli as server_cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, run", [
    (["serve", "--model", "t=tiny"], server_cli.serve_models),
    (["models"], operator_cli.run),
    (["deploy", "m=tiny"], operator_cli.run),
    (["evict", "m"], operator_cli.run),
    (["jobs", "--all"], operator_cli.run),
    (["cancel", "job-1"], operator_cli.run),
])
def test_each_subcommand_runs_its_own_sides_code(argv, run):
    assert parse_args(argv).run is run


def test_the_script_and_the_module_enter_the_facade():
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0]
    assert scripts == 'tether = "tether.cli:main"'
    assert "from tether.cli import main" in (ROOT / "tether" / "__main__.py").read_text()
