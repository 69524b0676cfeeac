"""`tether serve --model NAME=SPEC ...`: its options, then loading the models, serving them, stopping on a
signal. The `tether` command itself (tether/cli.py) registers this subcommand beside the client's operator
commands; this module imports nothing of the client.

When ready it prints exactly one line to stdout, `tether: serving on HOST:PORT` (the real port), so scripts
and tests can wait for it; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
from typing import Any

from tether.placement_options import add_placement_options

__all__ = ["add_command", "serve_models"]


def _size(text: str) -> int:
    from tether.sizes import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _module_name(text: str) -> str:
    if not all(part.isidentifier() for part in text.split(".")):
        raise argparse.ArgumentTypeError(f"expected a module name such as json or scipy.special, got {text!r}")
    return text


def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return convert


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add `serve` to the `tether` command's subcommands."""
    serve = commands.add_parser("serve", help="serve models over gRPC (JobService, ModelService, AdminService)")
    add_placement_options(serve, with_model=True)
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None,
                       help="port; 0 picks a free one; default: the clients' default port (that of TETHER_HOST, "
                            "else 8765) when it is free, else a free one")
    serve.add_argument("--api-keys", metavar="FILE",
                       help="file of accepted API keys, one per line (`KEY admin` for operators); without it only "
                            "loopback clients are served")
    serve.add_argument("--queue-size", type=_positive(int), default=16, help="jobs waiting per model (default 16)")
    serve.add_argument("--job-timeout", type=_positive(float), default=600.0,
                       help="seconds a job may run (default 600)")
    serve.add_argument("--max-result-bytes", type=_positive(_size), default=1 << 30, metavar="SIZE",
                       help="largest serialized result: bytes, or with a unit (1GiB, 512MiB; default 1GiB)")
    serve.add_argument("--allow-module", action="append", default=[], metavar="NAME", type=_module_name,
                       help="let programs import and call module NAME too (repeatable); the default allow-list "
                            "is torch, math, operator, collections, itertools, functools, einops, numpy, tether")
    serve.add_argument("--log-level", default="INFO", type=str.upper,
                       choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                       help="server log on stderr; INFO (default) logs one line per finished job")
    serve.add_argument("--result-ttl", type=_positive(float), default=600.0,
                       help="seconds a finished job's result is kept (default 600)")
    serve.add_argument("--local-call-timeout", type=_positive(float), default=60.0,
                       help="seconds to wait for a client's answer to a local() block (default 60)")
    serve.add_argument("--max-program-bytes", type=_positive(_size), default=1 << 20,
                       help="largest program a job may send (its source and shipped functions), bytes (default 1 MiB)")
    serve.add_argument("--job-memory", type=_size, default=None, metavar="BYTES",
                       help="memory one job may allocate in its worker (e.g. 4GiB); past it the job fails with "
                            "RESOURCE_EXHAUSTED and its worker restarts (default: half the machine's memory, "
                            "at most 8 GiB)")
    serve.add_argument("--replicas", type=_positive(int), default=1,
                       help="workers per model, each with its own copy of the model in memory and running one "
                            "job at a time (default 1)")
    serve.add_argument("--max-batch", type=_positive(int), default=16,
                       help="jobs for the same model that may share one batched forward pass or generation "
                            "(default 16); 1 runs every job alone")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0,
                       help="milliseconds a forming batch waits for the next compatible job (default 5; 4 times "
                            "that in all); a lone job never waits, except for the clients of a batch that just "
                            "ended (at most 5%% of that run); 0 never waits")
    serve.add_argument("--batch-tokens", type=_positive(int), default=8192,
                       help="rows x positions one batched run may take (default 8192)")
    serve.add_argument("--batch-local-wait", type=float, default=1.0,
                       help="seconds a batched job's local() blocks may keep the other jobs of its batch waiting, "
                            "in all (default 1); past that it leaves the batch and runs again alone")
    serve.add_argument("--ray", metavar="ADDRESS", default=None,
                       help="run each replica as an actor on a Ray cluster: `auto` (the one `ray start` started "
                            "on this machine), HOST:PORT (its head), or `local` (a private Ray instance); needs "
                            "`pip install tether[cluster]`); without --model, join the cluster's other front "
                            "doors: serve the models it hosts")
    serve.add_argument("--ray-namespace", metavar="NAME", default="tether",
                       help="with --ray: the front doors that share models and jobs (default tether)")
    serve.set_defaults(run=serve_models, check=_check)


def default_port_start(start: Any) -> Any:
    """Listen where clients look by default (the port of CONFIG.API.HOST: TETHER_HOST, the user config file,
    else 8765) when that port is free, else on a free one; either way say so on stderr."""
    from tether.config import CONFIG

    port = int(CONFIG.API.HOST.rpartition(":")[2] or 8765)
    try:
        handle = start(port=port)
    except OSError:
        handle = start(port=0)
        print(f"tether: port {port}, where clients look by default, is taken; point clients at this server "
              f"with TETHER_HOST={handle.address} or tether.CONFIG.API.HOST = '{handle.address}'",
              file=sys.stderr, flush=True)
    else:
        print(f"tether: port {port} is where clients look by default: they need no host setting",
              file=sys.stderr, flush=True)
    return handle


def _ready_stream():
    """Standard output for the ready line only: file descriptor 1 becomes stderr, so worker processes (which
    inherit it) never write to stdout nor keep it open after the server exits."""
    sys.stdout.flush()
    ready = os.fdopen(os.dup(1), "w")  # not inheritable: only this process holds the real stdout
    os.dup2(2, 1)
    return ready


def _check(args: argparse.Namespace) -> str | None:
    if args.models or args.ray:
        return None
    return "give at least one --model NAME=SPEC (or --ray ADDRESS to serve the models a Ray cluster hosts)"


def serve_models(args: argparse.Namespace) -> int:
    """Run `tether serve` as parsed into `args`, until SIGINT or SIGTERM; its exit status."""
    logging.basicConfig(level=getattr(logging, args.log_level), format="tether: %(message)s", stream=sys.stderr)
    from .app import start_server
    from .policy import DEFAULT_POLICY
    from .registry import load_model

    models = {}
    for model in args.models:
        name, spec, placement = model.name, model.spec, model.placement
        if name in models:
            print(f"tether: the model name {name!r} is given twice", file=sys.stderr)
            return 2
        print(f"tether: loading {name} ({spec}, {placement.describe()})...", file=sys.stderr, flush=True)
        try:
            models[name] = load_model(spec, placement)
        except Exception as error:
            print(f"tether: cannot load model {name}={spec}: {error}", file=sys.stderr)
            return 1
    start = functools.partial(
        start_server, models, args.host, api_keys=args.api_keys, replicas=args.replicas,
        sources={m.name: functools.partial(load_model, m.spec, m.placement) for m in args.models},
        placement=args.placement, queue_size=args.queue_size, job_timeout=args.job_timeout,
        max_result_bytes=args.max_result_bytes, result_ttl=args.result_ttl, local_call_timeout=args.local_call_timeout,
        policy=DEFAULT_POLICY.with_modules(args.allow_module), max_program_bytes=args.max_program_bytes,
        **({"job_memory": args.job_memory} if args.job_memory else {}),
        max_batch=args.max_batch, batch_wait=max(args.batch_wait_ms, 0.0) / 1000, batch_tokens=args.batch_tokens,
        batch_local_wait=max(args.batch_local_wait, 0.0),
        **({"ray": args.ray, "ray_namespace": args.ray_namespace} if args.ray else {}),
    )
    ready = _ready_stream()
    try:
        handle = start(port=args.port) if args.port is not None else default_port_start(start)
    except (OSError, ValueError) as error:
        print(f"tether: cannot start the server: {error}", file=sys.stderr)
        return 1
    models.clear()  # (the server holds what it keeps of them: a cluster's front door, their structure only)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"tether: serving on {handle.address}", file=ready, flush=True)
    if args.api_keys is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print("tether: no --api-keys: only clients on this machine are accepted", file=sys.stderr, flush=True)
    stop.wait()
    print("tether: stopping", file=sys.stderr, flush=True)
    handle.stop(grace=2.0)
    return 0
