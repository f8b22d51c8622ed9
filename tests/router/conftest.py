"""Fixtures for the router's HTTP tests: a tiny scriptable SGLang-like backend and a router on loopback."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from kvroute.engines.sim.fleet import SimFleet, free_port
from kvroute.router.app import METRICS, REGISTRY, ROUTER, create_app
from kvroute.router.config import RouterConfig
from kvroute.router.server import RouterRunner


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `pred` until true; fail after `timeout` seconds (a bounded wait, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def sse_data(raw: bytes) -> list[bytes]:
    """The payloads of an SSE body's `data:` lines, stripped, in order (`b"[DONE]"` included)."""
    return [line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")]


def pd_sim_fleet(regular: int = 0, **kw: Any) -> SimFleet:
    """The PD tests' fleet, not started: `regular` engines plus 2 prefill and 2 decode, a fast clock, and
    a bootstrap timeout long enough for a loaded 2-core host."""
    return SimFleet(regular, prefill=2, decode=2, time_scale=0.02, bootstrap_timeout_s=20.0, **kw)


def refused_url() -> str:
    """A loopback URL nothing listens on (the port was bound then released)."""
    return f"http://127.0.0.1:{free_port()}"


@dataclass
class Seen:
    path: str
    body: bytes
    headers: CIMultiDict[str]


@dataclass
class FakeEngine:
    """An SGLang-shaped backend whose behaviour tests script.

    `mode`: "ok" | "error500" | "die_mid_stream" | "slow_stream" (waits on `gate` before each chunk
    after the first) | "hang" (never answers until closed).
    """

    page_size: int = 16
    model: str = "fake-model"
    mode: str = "ok"
    chunks: int = 4
    cached_tokens: int = 7
    healthy: bool = True
    seen: list[Seen] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    gate: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    host: str = "127.0.0.1"  # any 127.x.y.z: discovery tests give pods distinct addresses on one port
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> FakeEngine:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/server_info", self._server_info)
        app.router.add_get("/model_info", self._model_info)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/get_load", self._load)
        app.router.add_post("/flush_cache", self._flush)
        app.router.add_post("/abort_request", self._abort)
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self._generate)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="", status=200 if self.healthy else 503)

    async def _server_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "page_size": self.page_size,
                "model_path": self.model,
                "disaggregation_mode": "null",
                "max_total_num_tokens": 100000,
            }
        )

    async def _model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.model, "is_generation": True})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _load(self, request: web.Request) -> web.Response:
        return web.json_response([{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}])

    async def _flush(self, request: web.Request) -> web.Response:
        return web.Response(text="Cache flushed.")

    async def _abort(self, request: web.Request) -> web.Response:
        self.aborts.append(orjson.loads(await request.read())["rid"])
        return web.Response()

    def _event(self, path: str, rid: str, i: int, last: bool) -> bytes:
        if path == "/generate":
            obj: dict[str, Any] = {
                "text": "x" * (i + 1),
                "meta_info": {
                    "id": rid,
                    "prompt_tokens": 40,
                    "cached_tokens": self.cached_tokens,
                    "completion_tokens": i + 1,
                    "finish_reason": {"type": "length"} if last else None,
                },
            }
        elif path == "/v1/chat/completions":
            obj = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": 0,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": "x"},
                        "finish_reason": "length" if last else None,
                    }
                ],
            }
        else:
            obj = {
                "id": rid,
                "object": "text_completion",
                "created": 0,
                "model": self.model,
                "choices": [{"index": 0, "text": "x", "finish_reason": "length" if last else None}],
            }
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.path, body, CIMultiDict(request.headers)))
        if self.mode == "error500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if self.mode == "hang":
            await asyncio.Event().wait()
        data = orjson.loads(body)
        rid = data.get("rid") or "rid-" + str(len(self.seen))
        if not data.get("stream"):
            if request.path == "/generate":
                return web.json_response(
                    {
                        "text": "xxxx",
                        "meta_info": {
                            "id": rid,
                            "prompt_tokens": 40,
                            "cached_tokens": self.cached_tokens,
                            "completion_tokens": 4,
                        },
                    },
                    headers={"X-Engine": "fake"},
                )
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": 0,
                    "model": self.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "xxxx"},
                            "finish_reason": "length",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 40,
                        "completion_tokens": 4,
                        "total_tokens": 44,
                        "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                    },
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Engine": "fake"})
        await resp.prepare(request)
        try:
            for i in range(self.chunks):
                if i and self.mode == "slow_stream":
                    await self.gate.get()
                if i == 2 and self.mode == "die_mid_stream":
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                await resp.write(self._event(request.path, rid, i, i == self.chunks - 1))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.disconnected.set()
            raise
        return resp


@pytest.fixture
async def engines() -> AsyncIterator[Callable[..., Awaitable[FakeEngine]]]:
    started: list[FakeEngine] = []

    async def make(**kw: Any) -> FakeEngine:
        e = await FakeEngine(**kw).start()
        started.append(e)
        return e

    yield make
    for e in started:
        await e.close()


@dataclass
class RunningRouter:
    url: str
    app: web.Application
    session: aiohttp.ClientSession

    @property
    def registry(self):  # type: ignore[no-untyped-def]
        return self.app[REGISTRY]

    @property
    def core(self):  # type: ignore[no-untyped-def]
        return self.app[ROUTER]

    async def wait_healthy(self, n: int, timeout: float = 5.0) -> None:
        await wait_until(lambda: len(self.registry.healthy_urls()) >= n, timeout, f"{n} healthy workers")


def test_config(**kw: Any) -> RouterConfig:
    base: dict[str, Any] = dict(
        port=0,
        policy="round_robin",
        registration_retry_s=0.02,
        health_check_interval_s=0,
        load_poll_interval_s=0,
        blind_check_interval_s=0,
        connect_timeout_s=2.0,
        request_timeout_s=10.0,
        stream_idle_timeout_s=5.0,
        no_worker_wait_s=0,  # answer 503 at once (tests of the start-up hold set it)
    )
    base.update(kw)
    return RouterConfig(**base)


test_config.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture
async def start_router() -> AsyncIterator[Callable[..., Awaitable[RunningRouter]]]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def make(config: RouterConfig | None = None, **kw: Any) -> RunningRouter:
        cfg = config or test_config(**kw)
        app = create_app(cfg)
        # What `kvroute serve` runs (the server's limits); a short drain keeps teardown bounded.
        runner = RouterRunner(app, cfg, app[METRICS], shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        session = aiohttp.ClientSession()
        sessions.append(session)
        return RunningRouter(f"http://{host}:{port}", app, session)

    yield make
    for s in sessions:
        await s.close()
    for r in runners:
        await r.cleanup()


# --- a Redis server of our own (replicas, serve --processes) -------------------------------------


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class RedisServer:
    """A private redis-server (no persistence) on a free loopback port; restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not _reachable(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private server when `redis-server` exists, else a reachable 127.0.0.1:6379 (keys namespaced
    per test, never flushed), else skip."""
    if shutil.which("redis-server"):
        srv = RedisServer(tmp_path_factory.mktemp("redis"))
        srv.start()
        try:
            yield srv.url
        finally:
            srv.stop()
    elif _reachable(6379):
        yield "redis://127.0.0.1:6379/0"
    else:
        pytest.skip("no redis-server binary and nothing listening on 127.0.0.1:6379")
