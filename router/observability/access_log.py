"""The opt-in structured access log: one JSON object per line per finished request.

Lines are buffered and flushed at most 0.5 s after they were written (one timer per burst), so a busy
router does one write syscall per buffer, not per request, and a quiet one still shows each line
promptly to `tail -f`.
"""

from __future__ import annotations

import asyncio
import sys
from typing import BinaryIO

import orjson

from kvroute.router.observability.phases import RequestPhases

FLUSH_AFTER_S = 0.5


class AccessLog:
    """Appends to `path` ("-": standard output). Not thread-safe: one event loop writes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._own = path != "-"
        self._f: BinaryIO = open(path, "ab", buffering=1 << 16) if self._own else sys.stdout.buffer  # noqa: SIM115
        self._timer: asyncio.TimerHandle | None = None
        self.lines = 0

    def write(self, ph: RequestPhases) -> None:
        self._f.write(orjson.dumps(ph.as_dict()) + b"\n")
        self.lines += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # outside a loop (library use): write through
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_AFTER_S, self.flush)

    def flush(self) -> None:
        self._timer = None
        try:
            self._f.flush()
        except (OSError, ValueError):  # closed stdout, full disk: never fail a request over the log
            pass

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        if self._own:
            self._f.close()
