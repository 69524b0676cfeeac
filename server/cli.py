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
import signal
import sys
import threading

from tether.placement_options import add_placement_options

__all__ = ["add_command", "serve_models"]


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
    serve.add_argument("--port", type=int, default=0, help="port; 0 (default) picks a free one")
    serve.add_argument("--api-keys", metavar="FILE",
                       help="file of accepted API keys, one per line (`KEY admin` for operators); without it only "
                            "loopback clients are served")
    serve.add_argument("--queue-size", type=_positive(int), default=16, help="jobs waiting per model (default 16)")
    serve.add_argument("--job-timeout", type=_positive(float), default=600.0,
                       help="seconds a job may run (default 600)")
    serve.add_argument("--max-result-bytes", type=_positive(int), default=1 << 30,
                       help="largest serialized result, bytes (default 1 GiB)")
    serve.add_argument("--result-ttl", type=_positive(float), default=600.0,
                       help="seconds a finished job's result is kept (default 600)")
    serve.add_argument("--local-call-timeout", type=_positive(float), default=60.0,
                       help="seconds to wait for a client's answer to a local() block (default 60)")
    serve.add_argument("--replicas", type=_positive(int), default=1,
                       help="workers per model, each with its own copy of the model in memory and running one "
                            "job at a time (default 1)")
    serve.set_defaults(run=serve_models, check=_check)


def _check(args: argparse.Namespace) -> str | None:
    return None if args.models else "give at least one --model NAME=SPEC"


def serve_models(args: argparse.Namespace) -> int:
    """Run `tether serve` as parsed into `args`, until SIGINT or SIGTERM; its exit status."""
    logging.basicConfig(level=logging.INFO, format="tether: %(message)s", stream=sys.stderr)
    from .app import start_server
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
    try:
        handle = start_server(
            models, args.host, args.port, api_keys=args.api_keys, replicas=args.replicas,
            sources={m.name: functools.partial(load_model, m.spec, m.placement) for m in args.models},
            placement=args.placement,
            queue_size=args.queue_size, job_timeout=args.job_timeout, max_result_bytes=args.max_result_bytes,
            result_ttl=args.result_ttl, local_call_timeout=args.local_call_timeout,
        )
    except (OSError, ValueError) as error:
        print(f"tether: cannot start the server: {error}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"tether: serving on {handle.address}", flush=True)
    if args.api_keys is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print("tether: no --api-keys: only clients on this machine are accepted", file=sys.stderr, flush=True)
    stop.wait()
    print("tether: stopping", file=sys.stderr, flush=True)
    handle.stop(grace=2.0)
    return 0
