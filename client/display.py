"""The status line of a remote job: spinner, state, job id and elapsed time, updated in place.

A terminal gets one line on stderr redrawn by a named thread; a notebook gets HTML updated in place;
anything else gets the final line only. `verbose` keeps every state; CONFIG.APP.DISPLAY turns it off.
"""

from __future__ import annotations

import html
import sys
import threading
import time
from typing import Any, TextIO

from tether.protocol import TERMINAL_NAMES

__all__ = ["StatusDisplay"]

_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_COLORS = {  # ANSI colours per state, terminal only
    "RECEIVED": "\033[36m",
    "QUEUED": "\033[33m",
    "DISPATCHED": "\033[35m",
    "RUNNING": "\033[34m",
    "DOWNLOADING": "\033[34m",
    "COMPLETED": "\033[32m",
    "ERROR": "\033[31m",
    "CANCELLED": "\033[31m",
}
_HTML_COLORS = {"COMPLETED": "#2e7d32", "ERROR": "#c62828", "CANCELLED": "#c62828", "QUEUED": "#b26a00"}
_TERMINAL = TERMINAL_NAMES
_RESET, _DIM, _BOLD = "\033[0m", "\033[2m", "\033[1m"
_REFRESH_S = 0.1  # spinner frame time, seconds
_NOTEBOOK_REFRESH_S = 0.5  # seconds between redraws of a notebook's status line
_ORDER = ("SUBMITTING", "RECEIVED", "QUEUED", "DISPATCHED", "RUNNING", "DOWNLOADING")  # then a terminal state


def _rank(state: str) -> int:
    """Where `state` comes in a job's life; the line never moves to an earlier one."""
    if state in _TERMINAL:
        return len(_ORDER)
    return _ORDER.index(state) if state in _ORDER else -1

def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class StatusDisplay:
    """One job's status, drawn where the user looks. All drawing happens under `_lock`."""

    def __init__(self, *, enabled: bool | None = None, verbose: bool = False, stream: TextIO | None = None):
        if enabled is None:
            from tether.config import CONFIG

            enabled = CONFIG.APP.DISPLAY
        self.enabled = enabled
        self.verbose = verbose
        self._stream = stream or sys.stderr
        self._notebook = enabled and stream is None and _in_notebook()
        self._tty = enabled and not self._notebook and bool(getattr(self._stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        # guarded by _lock:
        self._job_id = ""
        self._state = ""
        self._message = ""
        self._start = time.monotonic()
        self._state_start = self._start
        self._progress: tuple[int, int] | None = None  # (bytes received, total) while downloading
        self._elapsed: float | None = None  # the job's own time, from the server's events, once it ended
        self._drawn = False  # a partial line is on the terminal
        self._paused = 0
        self._handle: Any = None  # IPython DisplayHandle
        self._watch: _LineWatch | None = None  # sys.stdout while paused in a terminal
        self._mid_line = False  # the user's output ended without a newline: do not draw over it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- what the runner reports -----------------------------------------------------------------
    def update(self, job_id: str = "", state: str = "", message: str = "", *, elapsed: float | None = None) -> None:
        """A new state (or a new message in the same state); no arguments just redraws. A state earlier than
        the one shown is ignored (events replayed by a re-attach); `elapsed`: the job's time as the server
        measured it (shown once it ended, so a job fetched later shows how long it really took)."""
        if not self.enabled:
            return
        with self._lock:
            if state and _rank(state) < _rank(self._state):
                state = ""
            if elapsed is not None:
                self._elapsed = elapsed
            changed = bool(state) and state != self._state
            if job_id:
                self._job_id = job_id
            if state:
                if changed and self.verbose and self._state and self._tty:
                    self._write_line(final=True)  # keep the previous state on its own line
                if changed:
                    self._state_start = time.monotonic()
                    self._progress = None
                self._state = state
            if state or message:
                self._message = message
            if self._tty:
                self._write_line(final=self._state in _TERMINAL)
            elif self._notebook:
                self._write_html()
            elif changed and (self.verbose or self._state in _TERMINAL):
                self._stream.write(self._text(color=False) + "\n")
                self._stream.flush()
        if (self._tty or self._notebook) and self._state not in _TERMINAL:
            self._start_spinner()

    def progress(self, received: int, total: int) -> None:
        """Bytes of a large result received so far (drawn as a bar)."""
        if not self.enabled:
            return
        with self._lock:
            if self._state != "DOWNLOADING":
                if self.verbose and self._state and self._tty:
                    self._write_line(final=True)  # keep the previous state on its own line
                self._state, self._state_start = "DOWNLOADING", time.monotonic()
            self._progress = (received, total)
            if self._tty:
                self._write_line(final=False)
            elif self._notebook:
                self._write_html()

    def pause(self) -> None:
        """Clear the line so user output (a print in a local() block, a remote log line) reads cleanly."""
        if not self.enabled:
            return
        with self._lock:
            self._paused += 1
            if self._tty and self._drawn:
                self._stream.write("\r\033[2K")
                self._stream.flush()
                self._drawn = False
            if self._tty and self._watch is None:
                self._watch = _LineWatch(sys.stdout)
                sys.stdout = self._watch

    def resume(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._paused = max(0, self._paused - 1)
            if self._watch is not None and not self._paused:
                if sys.stdout is self._watch:
                    sys.stdout = self._watch.target
                if self._watch.wrote:
                    self._mid_line = not self._watch.at_line_start
                self._watch = None
            if self._tty and not self._paused and self._state:
                self._write_line(final=False)

    def close(self) -> None:
        """Stop the spinner and end the line (idempotent). Closed while an exception propagates (the server
        refused the job, the connection failed) before the job ended, the line says it did not run."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)
        error = sys.exc_info()[1]
        if self.enabled and error is not None and (self._drawn or self._handle is not None) \
                and self._state not in _TERMINAL:
            reason = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed: see the error below"
            self.update(state="ERROR", message=f"not completed ({reason})")
        with self._lock:
            if self._tty and self._drawn:
                self._stream.write("\n")
                self._stream.flush()
                self._drawn = False
            if self._notebook and self._handle is not None and self._state not in _TERMINAL:
                self._write_html(redraw=True)  # the last line stays: without a spinner, nothing moves now

    # ---- drawing (caller holds _lock) ------------------------------------------------------------
    def _text(self, *, color: bool) -> str:
        now = time.monotonic()
        state = self._state or "SUBMITTING"
        spinner = "" if state in _TERMINAL or self._stop.is_set() else _SPINNER[int(now / _REFRESH_S) % len(_SPINNER)] + " "
        c, r, d, b = (_COLORS.get(state, ""), _RESET, _DIM, _BOLD) if color else ("", "", "", "")
        job = f" {d}[job {self._job_id}]{r}" if self._job_id else ""
        elapsed = self._elapsed if self._elapsed is not None and state in _TERMINAL else now - self._start
        parts = [f"{spinner}{b}tether{r}{job} {c}{state}{r} {d}{elapsed:.1f}s{r}"]
        if self._progress is not None:
            received, total = self._progress
            parts.append(_bar(received, total, now - self._state_start))
        if self._message:
            parts.append(self._message)
        return "  ".join(parts)

    def _write_line(self, *, final: bool) -> None:
        if self._paused:
            return
        if self._mid_line:  # the user's text ends the line: redrawing would erase it
            if not final:
                return
            self._stream.write("\n")
            self._mid_line = False
        self._stream.write("\r\033[2K" + self._text(color=True) + ("\n" if final else ""))
        self._stream.flush()
        self._drawn = not final

    def _write_html(self, *, redraw: bool = False) -> None:
        """Show the line as HTML: a new output per state when verbose, else one output updated in place
        (`redraw`: always in place, the ticking clock)."""
        from IPython.display import HTML, display

        state = self._state or "SUBMITTING"
        color = _HTML_COLORS.get(state, "#1565c0")
        text = html.escape(self._text(color=False))
        markup = HTML(f'<pre style="margin:0;color:{color}">{text}</pre>')
        if self._handle is None or (self.verbose and not redraw):
            self._handle = display(markup, display_id=True)
        else:
            self._handle.update(markup)

    # ---- spinner ---------------------------------------------------------------------------------
    def _start_spinner(self) -> None:
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._spin, name="tether-status", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        """Redraw the line (the spinner and the elapsed time) until the job ends; a notebook's HTML less often."""
        refresh = _NOTEBOOK_REFRESH_S if self._notebook else _REFRESH_S
        while not self._stop.wait(refresh):
            with self._lock:
                if self._state in _TERMINAL:
                    return
                if self._notebook:
                    if self._handle is not None:
                        self._write_html(redraw=True)
                elif not self._paused:
                    self._write_line(final=False)


class _LineWatch:
    """Stands in for sys.stdout while user code prints during a job: forwards everything, and notes
    whether the output so far ends a line (the status line must not be drawn over a partial one)."""

    def __init__(self, target: TextIO):
        self.target = target
        self.wrote = False
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.wrote = True
            self.at_line_start = text.endswith("\n")
        return self.target.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


def _bar(received: int, total: int, seconds: float, width: int = 24) -> str:
    frac = received / total if total else 1.0
    filled = int(frac * width)
    rate = received / seconds / 1e6 if seconds > 0 else 0.0
    return (f"[{'#' * filled}{'.' * (width - filled)}] {frac:4.0%} "
            f"{received / 2**20:.1f}/{total / 2**20:.1f} MiB {rate:.0f} MB/s")
