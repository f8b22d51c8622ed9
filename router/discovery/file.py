"""File discovery: the workers listed in a JSON or YAML file that the operator's tooling writes.

The file is looked at every `poll_s` (inode, size, mtime) and re-read when it changed, and at least
every `interval_s`. Write it atomically (write a temporary file, then rename it over the old one):
a half-written or malformed file is reported and the previous set stays in force. It may appear after
start-up; a file that disappears keeps the last set too (an empty list `[]` is how to say "none").

Format: a list, or `{"workers": [...]}`; each item a URL or `{"url": ..., "role": "regular" | "prefill"
| "decode", "bootstrap_port": 8998, "kv_events": "tcp://host:5557"}` (`worker_type` is accepted for
`role`, as smg's worker API names it).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from kvroute.router.config import normalize_url
from kvroute.router.discovery.base import DiscoveredWorker, DiscoverySink, Snapshot, snapshot
from kvroute.router.types import WorkerRole


class DiscoveryFileError(ValueError):
    """The file cannot be read or does not hold a valid worker list."""


def parse_workers(data: Any) -> Snapshot:
    """The worker list -> snapshot; DiscoveryFileError naming the first bad item."""
    if isinstance(data, dict) and "workers" in data:
        data = data["workers"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise DiscoveryFileError("expected a list of workers (or {'workers': [...]})")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            item = {"url": item}
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            raise DiscoveryFileError(f"item {i}: expected a URL or an object with 'url', got {item!r}")
        unknown = set(item) - {"url", "role", "worker_type", "bootstrap_port", "kv_events"}
        if unknown:
            raise DiscoveryFileError(f"item {i}: unknown keys {sorted(unknown)}")
        url = normalize_url(item["url"])
        if not url.startswith("http://"):
            raise DiscoveryFileError(f"item {i}: worker url must start with http://, got {url!r}")
        try:
            role = WorkerRole(item.get("role") or item.get("worker_type") or "regular")
        except ValueError as exc:
            raise DiscoveryFileError(f"item {i}: role must be regular, prefill or decode") from exc
        port = item.get("bootstrap_port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise DiscoveryFileError(f"item {i}: bootstrap_port must be a port number or null, got {port!r}")
        kv = item.get("kv_events")
        if kv is not None and not isinstance(kv, str):
            raise DiscoveryFileError(f"item {i}: kv_events must be a string endpoint")
        out.append(DiscoveredWorker(url, role, port, kv))
    return snapshot(out)


def read_workers(path: Path) -> Snapshot:
    """Read and parse the file (JSON, or YAML by its .yaml/.yml suffix); DiscoveryFileError if unusable."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise DiscoveryFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json and yaml raise their own types; both mean "malformed"
        raise DiscoveryFileError(f"cannot parse {path}: {exc}") from exc
    try:
        return parse_workers(data)
    except DiscoveryFileError as exc:
        raise DiscoveryFileError(f"{path}: {exc}") from exc


class FileSource:
    """Publishes the file's workers when it changes (see the module docstring)."""

    name = "file"

    def __init__(self, path: str | Path, interval_s: float = 30.0, poll_s: float = 1.0) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self.poll_s = min(poll_s, interval_s)

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    async def run(self, sink: DiscoverySink) -> None:
        seen: tuple[int, int, int] | None | bool = False  # False: never looked
        next_read = 0.0
        while True:
            stamp = self._stamp()
            now = time.monotonic()
            if stamp != seen or now >= next_read:
                seen, next_read = stamp, now + self.interval_s
                try:
                    workers = await asyncio.to_thread(read_workers, self.path)
                except DiscoveryFileError as exc:
                    sink.error(str(exc))
                else:
                    sink.publish(workers)
            await asyncio.sleep(self.poll_s)
