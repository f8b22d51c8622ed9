"""In-process stand-in for SGLang's PD bootstrap server and KV transfer between simulated engines.

A prefill engine deposits, per `bootstrap_room`, what its prefill produced; a decode engine with the
same room waits for it. One registry object is shared by the engines of a fleet (passed in by the
fleet, never module state), so the pairing works only inside one process, like the sim itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PrefilledKv:
    """What crosses from prefill to decode: sizes for the transfer time, the first token, the cache hit."""

    room: int
    bootstrap_port: int | None
    prompt_tokens: int
    cached_tokens: int
    first_token: int | None
    kv_bytes: int


@dataclass(eq=False)
class _Room:
    future: asyncio.Future[PrefilledKv]
    waiters: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class BootstrapRegistry:
    """Rooms -> a future of `PrefilledKv`.

    An entry lives while a decode waits on it (`claim` removes it when the wait ends, however it ends).
    An entry nobody waits for yet (a deposit, or a prefill's failure, before its decode asks) is kept
    for `hold_s` wall seconds (the decode side's wait timeout: a decode arriving later would have timed
    out anyway) and then dropped, so rooms whose decode never comes cannot pile up.
    """

    def __init__(self, hold_s: float = 30.0) -> None:
        self.hold_s = hold_s
        self._rooms: dict[int, _Room] = {}

    def _entry(self, room: int) -> _Room:
        entry = self._rooms.get(room)
        if entry is None:
            entry = _Room(asyncio.get_running_loop().create_future())
            self._rooms[room] = entry
        return entry

    def _hold(self, room: int, entry: _Room, hold_s: float | None) -> None:
        """Nobody waits on this entry: drop it after the hold unless a claim takes it first."""
        if entry.waiters or entry.timer is not None:
            return
        delay = self.hold_s if hold_s is None else hold_s
        entry.timer = asyncio.get_running_loop().call_later(max(delay, 0.0), self._expire, room, entry)

    def _expire(self, room: int, entry: _Room) -> None:
        entry.timer = None
        if self._rooms.get(room) is entry and not entry.waiters:
            self._remove(room, entry)

    def _remove(self, room: int, entry: _Room, why: str = "the bootstrap room was dropped") -> None:
        if self._rooms.get(room) is entry:
            del self._rooms[room]
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        if not entry.future.done():  # a decode still waiting fails cleanly (RuntimeError), never hangs
            entry.future.set_exception(RuntimeError(why))
            entry.future.exception()

    def deposit(self, kv: PrefilledKv, hold_s: float | None = None) -> None:
        """The prefill's KV is ready; held for `hold_s` (default: the registry's) if no decode waits yet."""
        entry = self._entry(kv.room)
        if not entry.future.done():
            entry.future.set_result(kv)
        self._hold(kv.room, entry, hold_s)

    def fail(self, room: int, message: str, hold_s: float | None = None) -> None:
        """The prefill side aborted: a waiting decode fails at once, one arriving within the hold too."""
        entry = self._entry(room)
        if not entry.future.done():
            entry.future.set_exception(RuntimeError(message))
            entry.future.exception()  # mark retrieved: nobody may ever wait on this room
        self._hold(room, entry, hold_s)

    async def claim(self, room: int, timeout_s: float) -> PrefilledKv:
        """Wait up to `timeout_s` wall seconds for the room; raises TimeoutError or the prefill's error."""
        entry = self._entry(room)
        entry.waiters += 1
        try:
            return await asyncio.wait_for(asyncio.shield(entry.future), timeout_s)
        finally:
            entry.waiters -= 1
            if not entry.waiters:
                self._remove(room, entry)

    def pending(self) -> int:
        return len(self._rooms)

    def drop(self, room: int) -> None:
        """Forget a room now (a decode waiting on it fails with RuntimeError)."""
        entry = self._rooms.get(room)
        if entry is not None:
            self._remove(room, entry)

    def close(self) -> None:
        """Drop every room and its timer (the fleet is stopping)."""
        for room, entry in list(self._rooms.items()):
            self._remove(room, entry, "the fleet is stopping")
