"""`python -m bench._serve_child`: a tether server for the tiny GPT-2 in its own process (not a benchmark).

Prints the address it listens on as one line, serves until its standard input closes, then stops. Used by
bench/remote.py to measure a remote job without the client and the server sharing one interpreter (GIL).
"""

from __future__ import annotations

import sys

import torch

from tether import tiny
from tether.server.app import start_server


def main() -> int:
    torch.set_num_threads(1)
    server = start_server({"tiny": tiny.tiny_gpt2()}, queue_size=64, result_ttl=5.0)
    print(server.address, flush=True)
    sys.stdin.read()  # until the parent closes it
    server.stop(grace=0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
