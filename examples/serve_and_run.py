"""Start `tether serve` on loopback, run a client script against it, then stop the server.

    python examples/serve_and_run.py --model smollm2=smollm2 -- python examples/remote_demo.py

The client finds the server through TETHER_HOST. The server is stopped however the client ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

READY = "tether: serving on "
START_TIMEOUT_S = 300.0  # the first SmolLM2 load converts the packaged GGUF (~30 s on 2 cores)


def _wait_for_address(server: subprocess.Popen) -> str:
    """The HOST:PORT the server prints once ready; fails if it exits or stays silent too long."""
    found: list[str] = []
    done = threading.Event()

    def read() -> None:
        for line in server.stdout:
            if line.startswith(READY) and not found:
                found.append(line[len(READY):].strip())
                done.set()
            else:
                sys.stdout.write(line)
        done.set()

    threading.Thread(target=read, name="tether-serve-stdout", daemon=True).start()
    if not done.wait(START_TIMEOUT_S) or not found:
        raise SystemExit(f"tether serve did not become ready within {START_TIMEOUT_S:.0f} s "
                         f"(exit code {server.poll()}); see its output above.")
    return found[0]


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    serve_args, client = argv[:split], argv[split + 1:]
    server = subprocess.Popen([sys.executable, "-m", "tether", "serve", "--host", "127.0.0.1",
                               "--port", "0", *serve_args], stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        address = _wait_for_address(server)
        print(f"[demo] tether serve is up on {address}", flush=True)
        return subprocess.call(client, env={**os.environ, "TETHER_HOST": address})
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
