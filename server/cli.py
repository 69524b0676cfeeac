"""The `tether` command: `tether serve --model NAME=SPEC ...` loads models, serves them, stops on a signal.

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

__all__ = ["main", "parse_args"]


def _model_arg(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"expected NAME=SPEC (e.g. tiny=tiny or smollm2=smollm2), got {text!r}")
    return name, spec


def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return convert


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tether", description="tether: run intervention code on models.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve models over gRPC (JobService, ModelService)")
    serve.add_argument("--model", action="append", type=_model_arg, required=True, metavar="NAME=SPEC",
                       help="a model to host; SPEC: tiny, smollm2, a local directory, a Hugging Face id in the "
                            "local cache, or module:factory (returns a torch module or (model, tokenizer)); "
                            "repeat for several models")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="port; 0 (default) picks a free one")
    serve.add_argument("--api-keys", metavar="FILE",
                       help="file of accepted API keys, one per line; without it only loopback clients are served")
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
    serve.add_argument("--max-batch", type=_positive(int), default=16,
                       help="jobs for the same model that may share one batched forward pass or generation "
                            "(default 16); 1 runs every job alone")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0,
                       help="milliseconds a worker waits for more compatible jobs to batch (default 5)")
    serve.add_argument("--batch-tokens", type=_positive(int), default=8192,
                       help="rows x positions one batched run may take (default 8192)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="tether: %(message)s", stream=sys.stderr)
    from .app import start_server
    from .registry import load_model

    models = {}
    for name, spec in args.model:
        if name in models:
            print(f"tether: the model name {name!r} is given twice", file=sys.stderr)
            return 2
        print(f"tether: loading {name} ({spec})...", file=sys.stderr, flush=True)
        try:
            models[name] = load_model(spec)
        except Exception as error:
            print(f"tether: cannot load model {name}={spec}: {error}", file=sys.stderr)
            return 1
    try:
        handle = start_server(
            models, args.host, args.port, api_keys=args.api_keys, replicas=args.replicas,
            sources={name: functools.partial(load_model, spec) for name, spec in args.model},
            queue_size=args.queue_size, job_timeout=args.job_timeout, max_result_bytes=args.max_result_bytes,
            result_ttl=args.result_ttl, local_call_timeout=args.local_call_timeout,
            max_batch=args.max_batch, batch_wait=max(args.batch_wait_ms, 0.0) / 1000, batch_tokens=args.batch_tokens,
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


if __name__ == "__main__":
    sys.exit(main())
