"""The fault matrix's fixtures: a simulated fleet and a router on loopback, both in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from kvroute.engines.sim.fleet import SimFleet
from tests.router.conftest import engines, start_router, test_config, wait_until  # noqa: F401  (fixtures)

__all__ = ["engines", "fleet", "gen", "start_router", "test_config", "wait_until"]


@pytest.fixture
async def fleet() -> AsyncIterator[Callable[..., Awaitable[SimFleet]]]:
    started: list[SimFleet] = []

    async def make(workers: int = 3, **kw: Any) -> SimFleet:
        kw.setdefault("time_scale", 0.02)
        f = SimFleet(workers, **kw)
        await f.__aenter__()
        started.append(f)
        return f

    yield make
    for f in started:
        await f.__aexit__(None, None, None)


async def gen(
    session: aiohttp.ClientSession, url: str, text: str, *, stream: bool = False, max_new_tokens: int = 8
) -> tuple[int, bytes]:
    """One /generate request; (status, body)."""
    body = {"text": text, "stream": stream, "sampling_params": {"max_new_tokens": max_new_tokens}}
    async with session.post(url + "/generate", data=orjson.dumps(body)) as resp:
        return resp.status, await resp.read()
