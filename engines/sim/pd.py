"""In-process stand-in for SGLang's PD bootstrap server and KV transfer between simulated engines.

A prefill engine deposits, per `bootstrap_room`, what its prefill produced; a decode engine with the
same room waits for it. One registry object is shared by the engines of a fleet (passed in by the
fleet, never module state), so the pairing works only inside one process, like the sim itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PrefilledKv:
    """What crosses from prefill to decode: sizes for the transfer time, the first token, the cache hit."""

    room: int
    bootstrap_port: int | None
    prompt_tokens: int
    cached_tokens: int
    first_token: int | None
    kv_bytes: int


class BootstrapRegistry:
    """Rooms -> a future of `PrefilledKv`. Entries are removed when claimed or when `expire` runs."""

    def __init__(self) -> None:
        self._rooms: dict[int, asyncio.Future[PrefilledKv]] = {}

    def _future(self, room: int) -> asyncio.Future[PrefilledKv]:
        fut = self._rooms.get(room)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._rooms[room] = fut
        return fut

    def deposit(self, kv: PrefilledKv) -> None:
        fut = self._future(kv.room)
        if not fut.done():
            fut.set_result(kv)

    def fail(self, room: int, message: str) -> None:
        """The prefill side aborted: a waiting decode fails at once instead of timing out."""
        fut = self._future(room)
        if not fut.done():
            fut.set_exception(RuntimeError(message))
            fut.exception()  # mark retrieved: nobody may ever wait on this room

    async def claim(self, room: int, timeout_s: float) -> PrefilledKv:
        """Wait up to `timeout_s` wall seconds for the room; raises TimeoutError or the prefill's error."""
        fut = self._future(room)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        finally:
            self._rooms.pop(room, None)

    def pending(self) -> int:
        return len(self._rooms)

    def drop(self, room: int) -> None:
        """Forget an unclaimed deposit (the prefill side's hold timed out)."""
        fut = self._rooms.pop(room, None)
        if fut is not None and not fut.done():
            fut.cancel()
