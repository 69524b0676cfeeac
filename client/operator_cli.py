"""The operator's `tether` commands against a running server: models, deploy, evict, jobs, cancel.

Each parses its options, calls Admin (client/admin.py), and prints a table (or JSON with --json) to
stdout; errors go to stderr with exit status 1. The `tether` command (tether/cli.py) registers them beside
the server's `serve`; this module imports nothing of the server (the placement options are shared, in
tether/placement_options.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tether.placement_options import Placement, add_placement_options, model_arg
from tether.v1 import jobs_pb2, models_pb2, values_pb2

__all__ = ["add_commands", "run"]

DEPLOY_WAIT = 600.0  # s: how long `tether deploy` waits for the model to load, by default


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add models, deploy, evict, jobs and cancel to the `tether` command's subcommands."""
    models = commands.add_parser("models", help="the models a server hosts: state, replicas, device, dtype, queue")
    _connection(models, json_output=True)
    deploy = commands.add_parser("deploy", help="load a model on a running server (needs an admin key)")
    _connection(deploy)
    deploy.add_argument("model", type=model_arg, metavar="NAME=SPEC",
                        help="the name clients will use and what to load (as `tether serve --model` takes it)")
    deploy.add_argument("--replicas", type=int, default=0, help="worker replicas (default: the server's --replicas)")
    add_placement_options(deploy, with_model=False)
    waiting = deploy.add_mutually_exclusive_group()
    waiting.add_argument("--wait", type=float, default=DEPLOY_WAIT, metavar="SECONDS",
                         help=f"wait this long for the model to be ready (default {DEPLOY_WAIT:g})")
    waiting.add_argument("--no-wait", dest="wait", action="store_const", const=0.0,
                         help="return at once, the model still loading (`tether models` shows when it is ready)")
    evict = commands.add_parser("evict", help="stop hosting a model; its jobs are cancelled (needs an admin key)")
    _connection(evict)
    evict.add_argument("name", help="the model's name")
    evict.add_argument("--reason", default="", help="why, for the cancelled jobs' messages")
    jobs = commands.add_parser("jobs", help="everyone's queued and running jobs (needs an admin key)")
    _connection(jobs, json_output=True)
    jobs.add_argument("--all", action="store_true", help="also jobs that ended and are still kept")
    jobs.add_argument("--model", default="", help="only this model's jobs")
    cancel = commands.add_parser("cancel", help="cancel any job (needs an admin key)")
    _connection(cancel)
    cancel.add_argument("job_id", help="the job's id (`tether jobs` lists them)")
    cancel.add_argument("--reason", default="", help="why, for the job's status message")
    for parser in (models, deploy, evict, jobs, cancel):
        parser.set_defaults(run=run)


def _connection(parser: argparse.ArgumentParser, *, json_output: bool = False) -> None:
    parser.add_argument("--host", help="the server, HOST:PORT (default: TETHER_HOST, the user config, "
                                       "127.0.0.1:8765)")
    parser.add_argument("--api-key", help="an API key (default: TETHER_API_KEY); operating needs an admin key")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print JSON (one object per line) instead of a table")


def run(args: argparse.Namespace) -> int:
    """Run one operator command; its exit status."""
    from tether.runtime.errors import RemoteError

    from .admin import Admin

    try:
        with Admin(args.host, args.api_key) as admin:
            return _COMMANDS[args.command](admin, args)
    except RemoteError as error:
        print(f"tether {args.command}: {error}", file=sys.stderr)
        return 1


def _models(admin, args) -> int:
    rows = [_model_row(m) for m in admin.models()]
    _print(rows, args.json, ("name", "state", "replicas", "device", "dtype", "queue", "architecture", "message"))
    return 0


def _deploy(admin, args) -> int:
    (name, spec), placement = args.model, args.placement or Placement()
    info = admin.deploy(name, spec, replicas=args.replicas, device=placement.device, dtype=placement.dtype,
                        device_map=placement.device_map, wait=args.wait)
    row = _model_row(info)
    if info.state == models_pb2.MODEL_STATE_FAILED:
        print(f"tether deploy: {name} failed: {info.state_message}", file=sys.stderr)
        return 1
    print(f"{name}: {row['state']} ({row['replicas']} replicas, {row['device']}, {row['dtype']})")
    return 0


def _evict(admin, args) -> int:
    cancelled = admin.evict(args.name, args.reason)
    print(f"{args.name}: evicted ({cancelled} jobs cancelled)")
    return 0


def _jobs(admin, args) -> int:
    now = time.time()
    rows = [
        {"job_id": j.job.job_id, "model": j.job.model, "state": _state(j.job.status.state),
         "queue_position": j.job.status.queue_position, "owner": j.owner,
         "age_s": round(now - j.job.create_time.ToNanoseconds() / 1e9, 1), "message": j.job.status.message}
        for j in admin.jobs(include_finished=args.all, model=args.model)
    ]
    _print(rows, args.json, ("job_id", "model", "state", "queue_position", "owner", "age_s", "message"))
    return 0


def _cancel(admin, args) -> int:
    state = admin.stop(args.job_id, args.reason)
    print(f"{args.job_id}: {_state(state)}")
    return 0


_COMMANDS = {"models": _models, "deploy": _deploy, "evict": _evict, "jobs": _jobs, "cancel": _cancel}


def _state(state: int) -> str:
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def _model_row(info: models_pb2.ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "state": models_pb2.ModelState.Name(info.state).removeprefix("MODEL_STATE_").lower(),
        "replicas": info.replicas,
        "device": info.device,
        "dtype": values_pb2.DataType.Name(info.data_type).removeprefix("DATA_TYPE_").lower(),
        "queue": info.queue_depth,
        "architecture": info.architecture,
        "message": info.state_message,
    }


def _print(rows: list[dict[str, Any]], as_json: bool, columns: tuple[str, ...]) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    table = [[c.upper() for c in columns], *[[str(row[c]) for c in columns] for row in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
