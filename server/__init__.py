"""tether's model server: `tether serve` and `start_server`, hosting models behind the tether.v1 gRPC API.

Never imported by the runtime or the client. Submodules load lazily so `tether serve --help` is quick.
"""

__all__ = ["start_server", "ServerHandle"]


def __getattr__(name):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'tether.server' has no attribute {name!r}")
