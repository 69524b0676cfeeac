"""`tether.CONFIG`: where the server is, which API key to send, and how the client reports a remote job.

Precedence for the host and the key: a value set in code, then the environment (TETHER_HOST,
TETHER_API_KEY), then the user config file (~/.config/tether/config.json), then the default.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["CONFIG", "Config", "DEFAULT_HOST", "config_path"]

DEFAULT_HOST = "127.0.0.1:8765"

_file_lock = threading.Lock()  # guards reads and writes of the user config file
_file_cache: tuple[Path, int, int, dict[str, Any]] | None = None  # guarded by _file_lock: (path, mtime_ns, size, data)


_paths: dict[tuple[str | None, str | None], Path] = {}  # (XDG_CONFIG_HOME, HOME) -> config_path()


def config_path() -> Path:
    """The user config file: $XDG_CONFIG_HOME/tether/config.json, else ~/.config/tether/config.json."""
    key = (os.environ.get("XDG_CONFIG_HOME"), os.environ.get("HOME"))
    path = _paths.get(key)
    if path is None:
        base = key[0] or os.path.join(os.path.expanduser("~"), ".config")
        path = _paths[key] = Path(base) / "tether" / "config.json"
    return path


def _read_file() -> dict[str, Any]:
    """The user config file's settings, parsed again only when its path, mtime or size changed."""
    global _file_cache
    path = config_path()
    with _file_lock:
        try:
            st = path.stat()
        except OSError:
            return {}
        cached = _file_cache
        if cached is not None and cached[0] == path and cached[1] == st.st_mtime_ns and cached[2] == st.st_size:
            return cached[3]
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        data = data if isinstance(data, dict) else {}
        _file_cache = (path, st.st_mtime_ns, st.st_size, data)
    return data


def _update_file(**entries: Any) -> Path:
    global _file_cache
    path = config_path()
    with _file_lock:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        data.update(entries)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.chmod(tmp, 0o600)  # the file holds an API key
        os.replace(tmp, path)
        _file_cache = None
    return path


class _API:
    """Where jobs go: `HOST` ("host:port") and `APIKEY`; assigning either overrides env and file."""

    def __init__(self) -> None:
        self._host: str | None = None
        self._api_key: str | None = None

    @property
    def HOST(self) -> str:
        return self._host or os.environ.get("TETHER_HOST") or _read_file().get("host") or DEFAULT_HOST

    @HOST.setter
    def HOST(self, value: str | None) -> None:
        self._host = value

    @property
    def APIKEY(self) -> str | None:
        return self._api_key or os.environ.get("TETHER_API_KEY") or _read_file().get("api_key") or None

    @APIKEY.setter
    def APIKEY(self, value: str | None) -> None:
        self._api_key = value

    def __repr__(self) -> str:
        key = "set" if self.APIKEY else "unset"
        return f"API(HOST={self.HOST!r}, APIKEY=<{key}>)"


class _APP:
    """How the client reports a remote job."""

    def __init__(self) -> None:
        self.DEBUG = False  # print every event received, and library frames of remote tracebacks
        self.REMOTE_LOGGING = True  # print the program's remote `print`/`tracer.log` lines as they arrive
        self.DISPLAY = True  # show the job status line (and a progress bar for large results)

    def __repr__(self) -> str:
        return f"APP(DEBUG={self.DEBUG}, REMOTE_LOGGING={self.REMOTE_LOGGING}, DISPLAY={self.DISPLAY})"


class Config:
    """`CONFIG.API.HOST`, `CONFIG.API.APIKEY`, `CONFIG.APP.*`, `CONFIG.set_default_api_key(key)`."""

    def __init__(self) -> None:
        self.API = _API()
        self.APP = _APP()

    def set_default_api_key(self, api_key: str) -> None:
        """Use `api_key` from now on, and save it in the user config file for later sessions."""
        if not isinstance(api_key, str) or not api_key.strip():
            raise ValueError("set_default_api_key needs a non-empty string: the key your server operator gave you.")
        _update_file(api_key=api_key.strip())
        self.API.APIKEY = api_key.strip()

    def set_default_host(self, host: str) -> None:
        """Send jobs to `host` ("host:port") from now on, and save it in the user config file."""
        _update_file(host=host)
        self.API.HOST = host

    def __repr__(self) -> str:
        return f"Config({self.API!r}, {self.APP!r})"


CONFIG = Config()
