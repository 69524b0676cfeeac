"""Who is calling: API keys from a file (`authorization: Bearer <key>`), or loopback-only without keys.

A caller's identity is an opaque owner id (a hash of its key), so job records never hold keys.
Imports grpc and the standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable

from .errors import Unauthenticated

__all__ = ["Authenticator", "read_keys", "LOOPBACK_OWNER"]

LOOPBACK_OWNER = "loopback"  # the owner of every job on a server started without keys
_KEY_HINT = "pass api_key=... (or set TETHER_API_KEY, or CONFIG.set_default_api_key(...))"


def read_keys(path: str | os.PathLike[str]) -> frozenset[str]:
    """The API keys in `path`: one per line; blank lines and lines starting with '#' are ignored."""
    with open(path, encoding="utf-8") as f:
        keys = frozenset(line.strip() for line in f if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ValueError(f"the API key file {os.fspath(path)!r} holds no keys (one key per line, '#' comments)")
    return keys


class Authenticator:
    """Checks each call's metadata and peer; `identify(context)` returns the caller's owner id."""

    def __init__(self, keys: Iterable[str] | None = None):
        self._keys = {k: _owner(k) for k in keys} if keys is not None else None  # read-only after init

    @property
    def requires_keys(self) -> bool:
        return self._keys is not None

    def identify(self, context) -> str:
        """The owner id of the caller of `context` (a grpc.ServicerContext); raises Unauthenticated."""
        if self._keys is None:
            peer = context.peer()
            if not is_loopback(peer):
                raise Unauthenticated(
                    f"this server was started without --api-keys, so it accepts only clients on its own "
                    f"machine (loopback), and you connected from {peer}. Run the client on the server's "
                    f"machine, or start the server with `tether serve --api-keys FILE` and {_KEY_HINT}."
                )
            return LOOPBACK_OWNER
        key = _bearer(context.invocation_metadata())
        if key is None:
            raise Unauthenticated(
                f"this server requires an API key and the call carried none: {_KEY_HINT}; it travels as "
                "`authorization: Bearer <key>` metadata."
            )
        for known, owner in self._keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return owner
        shown = f"...{key[-4:]}" if len(key) > 8 else "given"
        raise Unauthenticated(
            f"the {shown} API key is not one this server accepts: check it for typos or ask the server's "
            f"operator for a key, then {_KEY_HINT}."
        )


def _owner(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _bearer(metadata) -> str | None:
    for item in metadata or ():
        if item.key.lower() == "authorization":
            value = item.value if isinstance(item.value, str) else item.value.decode()
            scheme, _, token = value.strip().partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else value.strip()
            return token or None
    return None


def is_loopback(peer: str) -> bool:
    """Whether a grpc peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...") is this machine."""
    kind, _, rest = peer.partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind == "ipv4":
        host = rest.rsplit(":", 1)[0]
    elif kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]").split("%")[0]
    else:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback
