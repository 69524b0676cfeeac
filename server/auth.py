"""Who is calling: API keys from a file (`authorization: Bearer <key>`), or loopback-only without keys; and
who may operate the server (keys marked `admin`; every loopback caller of a server without keys).

A caller's identity is an opaque owner id (a hash of its key), so job records never hold keys.
Imports grpc and the standard library only.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable

from .errors import PermissionDenied, Unauthenticated

__all__ = ["Authenticator", "read_keys", "LOOPBACK_OWNER", "ROLES"]

LOOPBACK_OWNER = "loopback"  # the owner of every job on a server started without keys
_KEY_HINT = "pass api_key=... (or set TETHER_API_KEY, or CONFIG.set_default_api_key(...))"


ROLES = frozenset({"admin"})  # what may follow a key on its line: `admin` may deploy, evict, list and stop jobs


def read_keys(path: str | os.PathLike[str], role: str | None = None) -> frozenset[str]:
    """The API keys in `path` (with `role`: only the keys marked with it).

    One key per line, optionally followed by roles (`KEY admin`); blank lines and lines starting with '#'
    are ignored."""
    keys, marked = set(), set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, *roles = line.split()
            unknown = set(roles) - ROLES
            if unknown:
                raise ValueError(f"{os.fspath(path)}:{number}: unknown role {sorted(unknown)[0]!r} after the key; "
                                 f"a line is `KEY` or `KEY admin`")
            keys.add(key)
            if role in roles:
                marked.add(key)
    if not keys:
        raise ValueError(f"the API key file {os.fspath(path)!r} holds no keys (one key per line, '#' comments)")
    return frozenset(marked if role is not None else keys)


class Authenticator:
    """Checks each call's metadata and peer; `identify(context)` returns the caller's owner id."""

    def __init__(self, keys: Iterable[str] | None = None, admin_keys: Iterable[str] = ()):
        self._keys = {k: _owner(k) for k in keys} if keys is not None else None  # read-only after init
        self._admins = frozenset(_owner(k) for k in admin_keys)  # owner ids of admin keys; read-only
        if self._keys is None and self._admins:
            raise ValueError("admin keys were given without the server's keys: list them among the API keys")
        if self._keys is not None and not self._admins <= set(self._keys.values()):
            raise ValueError("every admin key must also be one of the server's API keys")

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


    def identify_admin(self, context) -> str:
        """As identify, for AdminService calls: PermissionDenied unless the key is marked admin (a server
        without keys takes its loopback callers as admins)."""
        owner = self.identify(context)
        if self._keys is not None and owner not in self._admins:
            raise PermissionDenied(
                "operating this server (deploy, evict, jobs, cancel) needs an admin API key, and this call's key "
                "is not one: use a key marked `admin` in the server's key file (a line `KEY admin`) with "
                "--api-key or TETHER_API_KEY."
            )
        return owner


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


@functools.lru_cache(maxsize=256)  # every RPC asks; a client's calls share its connection's peer string
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
