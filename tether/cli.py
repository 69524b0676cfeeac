"""The `tether` command: one parser whose subcommands come from the side that runs them, `serve` from
tether.server.cli and the operator's commands (models, deploy, evict, jobs, cancel) from
tether.client.operator_cli. With `tether/__main__.py` and the package's `__init__`, the only modules that
wire client and server together; neither side imports this one.

Each subcommand sets `run(args) -> exit status` and may set `check(args) -> problem or None` as defaults of
its parser: a problem is reported as that subcommand's usage error (exit status 2).
"""

from __future__ import annotations

import argparse

from tether.client import operator_cli
from tether.server import cli as server_cli

__all__ = ["main", "parse_args", "version"]


def version() -> str:
    """The installed tether's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("tether")
    except PackageNotFoundError:
        return "unknown (not installed)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The `tether` command line as parsed by its subcommand; exits with a usage error on bad input."""
    parser = argparse.ArgumentParser(prog="tether", description="tether: run intervention code on models.")
    parser.add_argument("--version", action="version", version=f"tether {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    server_cli.add_command(commands)
    operator_cli.add_commands(commands)
    args = parser.parse_args(argv)
    check = getattr(args, "check", None)
    problem = check(args) if check else None
    if problem:
        commands.choices[args.command].error(problem)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the `tether` command; its exit status."""
    args = parse_args(argv)
    return args.run(args)
