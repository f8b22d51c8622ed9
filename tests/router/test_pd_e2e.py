"""PD end to end over loopback: a simulated fleet (2 prefill + 2 decode, plus a regular worker for
conditional disaggregation) behind a minimal aiohttp app that calls `kvroute.router.pd.forward_pd`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from kvroute.engines.core import GenerateRequest
from kvroute.engines.sim.fleet import SimFleet
from kvroute.engines.sim.server import SimServer
from kvroute.router.core import Router
from kvroute.router.pd import PREFILL_WORKER_HEADER, WORKER_HEADER, PDConfig, PDContext, forward_pd
from kvroute.router.pd_metrics import PDMetrics
from kvroute.router.types import Worker, WorkerRole, WorkerState
from tests.router.conftest import pd_sim_fleet, sse_data

LONG = "The quick brown fox jumps over the lazy dog. " * 12  # ~540 byte tokens
SHORT = "Hi there, how are you?"  # 22 byte tokens


@dataclass
class Harness:
    fleet: SimFleet
    router: Router
    ctx: PDContext
    metrics: PDMetrics
    base: str
    client: aiohttp.ClientSession
    seen: dict[str, list[GenerateRequest]] = field(default_factory=dict)

    def requests_at(self, urls: list[str]) -> list[tuple[str, GenerateRequest]]:
        return [(u, r) for u in urls for r in self.seen.get(u, [])]

    async def wait_idle(self, deadline_s: float = 5.0) -> None:
        """Every engine has nothing running or waiting (a decode waiting on a room counts), the router
        released every worker's load (the handler's cleanup may still run after the client's EOF), and
        no bootstrap room is left (one nobody claims is dropped after the decode wait: 0.4 s here)."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if (
                all(not e.by_rid for e in self.fleet.engines)
                and all(
                    w.load.in_flight == 0 and w.load.pending_prefill_tokens == 0
                    for w in self.router.workers()
                )
                and self.fleet.registry.pending() == 0
            ):
                return
            await asyncio.sleep(0.01)
        busy = {s.url: list(s.engine.by_rid) for s in self.fleet.servers if s.engine.by_rid}
        loads = {w.url: w.load for w in self.router.workers() if w.load.in_flight}
        rooms = self.fleet.registry.pending()
        raise AssertionError(f"engines still busy: {busy}; router loads {loads}; rooms left {rooms}")


def _record(server: SimServer, seen: dict[str, list[GenerateRequest]]) -> None:
    engine = server.engine
    inner = engine.generate
    log = seen.setdefault(server.url, [])

    def generate(req: GenerateRequest) -> AsyncIterator[Any]:
        log.append(req)
        return inner(req)

    engine.generate = generate  # type: ignore[method-assign]


def _routing_for(router: Router, parsed: dict[str, Any]) -> Any:
    if "messages" in parsed:
        return router.routing_request(messages=parsed["messages"])
    if "prompt" in parsed:
        return router.routing_request(text=parsed["prompt"])
    text, ids = parsed.get("text"), parsed.get("input_ids")
    if isinstance(text, list):  # a batch is routed on its first prompt (one pair serves all items)
        text = text[0]
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        ids = ids[0]
    return router.routing_request(text=text, input_ids=ids)


@pytest.fixture
def make_harness() -> Callable[..., Any]:
    async def make(config: PDConfig | None = None, regular: int = 0, **fleet_kw: Any) -> Any:
        fleet = pd_sim_fleet(regular, **fleet_kw)
        await fleet.start()
        router = Router(block_size=16, policy="least_load")
        for info in fleet.workers():
            role = {"null": WorkerRole.REGULAR, "prefill": WorkerRole.PREFILL, "decode": WorkerRole.DECODE}
            router.add_worker(
                Worker(
                    info.url,
                    role=role[info.role],
                    state=WorkerState.HEALTHY,
                    page_size=16,
                    bootstrap_port=info.bootstrap_port,
                )
            )
        seen: dict[str, list[GenerateRequest]] = {}
        for s in fleet.servers:
            _record(s, seen)
        session = aiohttp.ClientSession()
        metrics = PDMetrics(CollectorRegistry())
        ctx = PDContext.create(session, router, config or PDConfig(abort_timeout_s=2.0), observer=metrics)

        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            parsed = orjson.loads(body)
            return await forward_pd(ctx, request, request.path, body, parsed, _routing_for(router, parsed))

        app = web.Application()
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        client = aiohttp.ClientSession()
        h = Harness(fleet, router, ctx, metrics, f"http://127.0.0.1:{port}", client, seen)

        async def close() -> None:
            await client.close()
            await runner.cleanup()
            await session.close()
            await fleet.close()

        return h, close

    return make


@pytest.fixture
async def pd(make_harness: Callable[..., Any]) -> AsyncIterator[Harness]:
    h, close = await make_harness()
    try:
        yield h
    finally:
        await close()


async def test_pair_gets_the_same_room_and_the_stream_comes_from_decode(pd: Harness) -> None:
    body = {"text": LONG, "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}, "stream": True}
    async with pd.client.post(pd.base + "/generate", json=body) as resp:
        raw = await resp.read()
        assert resp.status == 200, raw
        decode_url = resp.headers[WORKER_HEADER]
        prefill_url = resp.headers[PREFILL_WORKER_HEADER]
    assert decode_url in pd.fleet.decode_urls and prefill_url in pd.fleet.prefill_urls
    events = sse_data(raw)
    assert events[-1] == b"[DONE]"
    last = orjson.loads(events[-2])
    assert last["meta_info"]["completion_tokens"] == 8
    pre = pd.requests_at(pd.fleet.prefill_urls)
    dec = pd.requests_at(pd.fleet.decode_urls)
    assert [u for u, _ in pre] == [prefill_url] and [u for u, _ in dec] == [decode_url]
    p_req, d_req = pre[0][1], dec[0][1]
    assert p_req.bootstrap_room is not None and 0 <= p_req.bootstrap_room < 2**63
    assert p_req.bootstrap_room == d_req.bootstrap_room
    bootstrap_port = pd.router.get_worker(prefill_url).bootstrap_port  # type: ignore[union-attr]
    assert p_req.bootstrap_port == d_req.bootstrap_port == bootstrap_port
    assert p_req.bootstrap_host == d_req.bootstrap_host == "127.0.0.1"
    assert p_req.rid == d_req.rid and p_req.input_ids == d_req.input_ids
    await pd.wait_idle()


async def test_non_streaming_and_openai_routes_through_a_pair(pd: Harness) -> None:
    body = {"text": LONG, "sampling_params": {"max_new_tokens": 4}}
    async with pd.client.post(pd.base + "/generate", json=body) as resp:
        out = await resp.json()
        assert resp.status == 200, out
    assert out["meta_info"]["completion_tokens"] == 4
    chat = {
        "messages": [{"role": "system", "content": LONG}, {"role": "user", "content": "Summarise."}],
        "max_tokens": 3,
    }
    async with pd.client.post(pd.base + "/v1/chat/completions", json=chat) as resp:
        out = await resp.json()
        assert resp.status == 200, out
    assert out["usage"]["completion_tokens"] == 3
    rooms = [(r.bootstrap_room, r.rid) for _, r in pd.requests_at(pd.fleet.prefill_urls)]
    assert sorted(rooms) == sorted((r.bootstrap_room, r.rid) for _, r in pd.requests_at(pd.fleet.decode_urls))
    assert len({room for room, _ in rooms}) == 2  # a fresh room per request
    await pd.wait_idle()


@pytest.mark.parametrize("stream", [False, True])
async def test_batch_gets_one_room_per_item_on_both_servers(pd: Harness, stream: bool) -> None:
    prompts = [LONG, "A different prompt entirely. " * 10]
    body = {
        "text": prompts,
        "sampling_params": {"max_new_tokens": 3, "ignore_eos": True},
        "stream": stream,
    }
    async with pd.client.post(pd.base + "/generate", json=body) as resp:
        raw = await resp.read()
        assert resp.status == 200, raw
    if stream:
        events = [orjson.loads(e) for e in sse_data(raw)[:-1]]
        finals = {e["index"]: e for e in events if e["meta_info"]["finish_reason"] is not None}
        assert sorted(finals) == [0, 1]
        outs = [finals[0], finals[1]]
    else:
        outs = orjson.loads(raw)
        assert isinstance(outs, list) and len(outs) == 2
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [3, 3]
    pre = [r for _, r in pd.requests_at(pd.fleet.prefill_urls)]
    dec = [r for _, r in pd.requests_at(pd.fleet.decode_urls)]
    assert len(pre) == len(dec) == 2
    pairs = {u for u, _ in pd.requests_at(pd.fleet.prefill_urls + pd.fleet.decode_urls)}
    assert len(pairs) == 2  # one pair serves the whole batch
    by_room = {r.bootstrap_room: r for r in pre}
    assert len(by_room) == 2 and all(room is not None for room in by_room)  # one fresh room per item
    for d in dec:  # the decode item with a room is the prefill item with that room: same prompt, same rid
        p = by_room[d.bootstrap_room]
        assert (p.rid, p.input_ids) == (d.rid, d.input_ids)
    assert {o["meta_info"]["id"] for o in outs} == {r.rid for r in dec}
    await pd.wait_idle()


async def test_failing_prefill_gives_a_clean_error_and_aborts_decode(pd: Harness) -> None:
    for i, url in enumerate(pd.fleet.urls):
        if url in pd.fleet.prefill_urls:
            await pd.fleet.set_faults(i, error_rate=1.0)
    body = {"text": LONG, "sampling_params": {"max_new_tokens": 8}, "stream": True}
    async with pd.client.post(pd.base + "/generate", json=body) as resp:
        out = await resp.json()
        assert resp.status == 502, out
    assert "prefill worker" in out["error"]["message"]
    # both prefill workers were tried (retry picks a new pair), every decode that waited was aborted
    tried = {u for u, _ in pd.requests_at(pd.fleet.prefill_urls)}
    assert tried == set(pd.fleet.prefill_urls)
    await pd.wait_idle()
    assert pd.metrics.aborts.labels("decode")._value.get() >= 1


async def test_decode_that_dies_mid_stream_ends_the_stream_with_an_error(pd: Harness) -> None:
    for i, url in enumerate(pd.fleet.urls):
        if url in pd.fleet.decode_urls:
            await pd.fleet.set_faults(i, die_after_tokens=2)
    body = {"text": LONG, "sampling_params": {"max_new_tokens": 32, "ignore_eos": True}, "stream": True}
    async with pd.client.post(pd.base + "/generate", json=body) as resp:
        assert resp.status == 200
        raw = await resp.read()
    events = sse_data(raw)
    err = orjson.loads(events[-2])
    assert "error" in err and events[-1] == b"[DONE]"
    await pd.wait_idle()


async def test_unreachable_decode_is_retried_on_another_pair(pd: Harness) -> None:
    first_decode = pd.fleet.urls.index(pd.fleet.decode_urls[0])
    await pd.fleet.set_faults(first_decode, refuse_connections=True)
    body = {"text": LONG, "sampling_params": {"max_new_tokens": 4}}
    for _ in range(3):
        async with pd.client.post(pd.base + "/generate", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers[WORKER_HEADER] == pd.fleet.decode_urls[1]
    await pd.wait_idle()


async def test_client_disconnect_aborts_both_sides(pd: Harness) -> None:
    body = {"text": LONG, "sampling_params": {"max_new_tokens": 5000, "ignore_eos": True}, "stream": True}
    async with pd.client.post(pd.base + "/generate", json=body) as resp:
        assert resp.status == 200
        await resp.content.readline()  # the first event arrived: a decode is running
        assert any(e.by_rid for e in pd.fleet.engines)
        resp.close()
    await pd.wait_idle()


async def test_conditional_disaggregation_sends_short_prompts_to_the_local_pool(
    make_harness: Callable[..., Any],
) -> None:
    cfg = PDConfig(local_prefill_max_tokens=64, abort_timeout_s=2.0)
    h, close = await make_harness(cfg, regular=1)
    try:
        short = {"text": SHORT, "sampling_params": {"max_new_tokens": 4}}
        async with h.client.post(h.base + "/generate", json=short) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers[WORKER_HEADER] == h.fleet.regular_urls[0]
            assert PREFILL_WORKER_HEADER not in resp.headers
        assert h.requests_at(h.fleet.prefill_urls + h.fleet.decode_urls) == []
        local = h.requests_at(h.fleet.regular_urls)
        assert len(local) == 1 and local[0][1].bootstrap_room is None  # a plain request
        long = {"text": LONG, "sampling_params": {"max_new_tokens": 4}}
        async with h.client.post(h.base + "/generate", json=long) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers[WORKER_HEADER] in h.fleet.decode_urls
        assert len(h.requests_at(h.fleet.prefill_urls)) == 1
        assert h.metrics.requests.labels("local", "ok")._value.get() == 1
        assert h.metrics.requests.labels("disaggregated", "ok")._value.get() == 1
        summary = h.metrics.window.summary()
        assert summary.requests == 2 and summary.local_fraction == 0.5
        await h.wait_idle()
    finally:
        await close()


async def test_decode_mode_rejects_a_plain_request_as_sglang_does(pd: Harness) -> None:
    """Why conditional disaggregation needs a regular pool: SGLang's decode mode needs a room."""
    async with pd.client.post(pd.fleet.decode_urls[0] + "/generate", json={"text": SHORT}) as resp:
        assert resp.status == 400
        assert "bootstrap_room" in await resp.text()
