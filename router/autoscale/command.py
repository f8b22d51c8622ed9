"""The command scaler: the operator's hook program does the scaling (`--autoscale-command`).

Contract (docs/autoscale.md):
- run without a shell (the command line split as a POSIX shell would), once per scaling action;
- stdin: one JSON object, `ScaleRequest.as_dict()`: `pool` ("prefill" | "decode"), `current`, `target`,
  `remove` (URLs of the workers the router drained and wants stopped, on a scale-down), `reason`, `plan`;
- exit status 0: done. stdout may then hold a JSON object `{"added": [{"url": ..., "bootstrap_port": ...,
  "kv_events": ...}]}` naming the engines it started, which the router registers (omit it when discovery
  registers them);
- any other exit status, or running past the timeout (the hook is killed), is a failure: logged with the
  end of its stderr, counted, and retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
from collections.abc import Mapping, Sequence

from kvroute.router.autoscale.base import NewWorker, ScaleRequest, ScalerError
from kvroute.router.types import WorkerRole


class CommandScaler:
    name = "command"

    def __init__(self, command: str, timeout_s: float = 60.0) -> None:
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("the autoscale command is empty")
        self.timeout_s = timeout_s

    async def sizes(self) -> Mapping[WorkerRole, int] | None:
        return None  # the hook does not say: the registry's counts are the pools' sizes

    async def scale(self, request: ScaleRequest) -> Sequence[NewWorker]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise ScalerError(f"cannot run {self.argv[0]}: {exc.strerror or exc}") from exc
        payload = json.dumps(request.as_dict()).encode()
        try:
            out, err = await asyncio.wait_for(proc.communicate(payload), self.timeout_s or None)
        except TimeoutError as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise ScalerError(f"{self.argv[0]} ran past {self.timeout_s:g}s and was killed") from exc
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip()[-300:]
            raise ScalerError(f"{self.argv[0]} exited with {proc.returncode}" + (f": {tail}" if tail else ""))
        return parse_added(out, request.pool)

    async def close(self) -> None:
        return None


def parse_added(stdout: bytes, pool: WorkerRole) -> list[NewWorker]:
    """The hook's optional `{"added": [...]}`; anything else on stdout is ignored (logs are fine)."""
    text = stdout.decode(errors="replace").strip()
    if not text.startswith("{"):
        return []
    try:
        obj = json.loads(text)
    except ValueError:
        return []
    items = obj.get("added") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        return []
    out = []
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("url"), str):
            raise ScalerError(f"hook output: each 'added' item needs a 'url', got {it!r}", retryable=False)
        bp = it.get("bootstrap_port")
        kv = it.get("kv_events")
        out.append(
            NewWorker(
                it["url"],
                pool,
                bp if isinstance(bp, int) and not isinstance(bp, bool) else None,
                kv if isinstance(kv, str) else None,
            )
        )
    return out
