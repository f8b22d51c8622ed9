"""Shared helpers for the simulated-engine tests: fleets, HTTP sessions, KV-event subscribers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from kvroute.engines.sim.fleet import SimFleet

FAST = 0.01
"""Time scale of test fleets: 100x faster than the simulated GPU."""


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `cond` until true, failing the test after `timeout` wall seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    """One regular engine on the tiny profile, 100x faster than real time."""
    async with SimFleet(1, time_scale=FAST) as f:
        yield f


class EventTap:
    """A SUB socket on one engine's KV-event stream collecting raw (topic, seq, payload) frames."""

    def __init__(self, endpoint: str, topic: str = "") -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sock.connect(endpoint)
        self.frames: list[tuple[bytes, int, bytes]] = []
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        while True:
            topic, seq, payload = await self.sock.recv_multipart()
            self.frames.append((topic, int.from_bytes(seq, "big"), payload))

    def decoded(self, decoder: msgspec.msgpack.Decoder[Any]) -> list[Any]:
        return [decoder.decode(p) for _, _, p in self.frames]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sock.close(linger=0)
        self.ctx.term()


async def tap_events(session: aiohttp.ClientSession, url: str, endpoint: str) -> EventTap:
    """Subscribe and prove the subscription is live (ZeroMQ's slow joiner): flush until a batch arrives."""
    tap = EventTap(endpoint)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while not tap.frames:
        if loop.time() > deadline:
            await tap.close()
            raise AssertionError("no KV-event batch reached the subscriber")
        async with session.post(url + "/flush_cache") as r:
            assert r.status == 200
        await asyncio.sleep(0.01)
    tap.frames.clear()
    return tap


async def generate(
    session: aiohttp.ClientSession, url: str, text: str | None = None, max_new_tokens: int = 4, **extra: Any
) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"sampling_params": {"max_new_tokens": max_new_tokens}, **extra}
    if text is not None:
        body["text"] = text
    async with session.post(url + "/generate", json=body) as r:
        return r.status, await r.json()
