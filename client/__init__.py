"""tether's client: runs contexts marked `remote=True` on a tether server over gRPC.

`RemoteBackend` (blocking and non-blocking jobs), `tether.client.aio` (awaitable jobs), `load_remote_spec`
(a hosted model's structure and tokenizer), `Admin` (operating a server). Nothing here is imported by `import tether` until first used.
"""

from .admin import Admin
from .runner import RemoteBackend, run_remote
from .spec import fetch_spec, load_remote_spec

__all__ = ["Admin", "RemoteBackend", "run_remote", "load_remote_spec", "fetch_spec"]
