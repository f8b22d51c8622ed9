"""Admission over real HTTP on loopback: a scriptable engine holds its first request (no first token:
its prefill stays pending), so the next request finds every worker saturated and queues."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import orjson

from kvroute.router.app import ADMIN
from tests.router.conftest import FakeEngine, test_config, wait_until

TENANTS = {
    "chat": {"class": "interactive", "api_keys": ["key-chat"]},
    "jobs": {"class": "quick", "api_keys": ["key-jobs"], "weight": 2},
}
# A class that waits 0.5 s at most, so the 429 test is quick; bound 1 token: one request in
# prefill saturates a worker.
CLASSES = {"quick": {"priority": 0, "max_queue_wait_s": 0.5}}


def _config(**kw: Any) -> Any:
    return test_config(
        tenants=TENANTS, classes=CLASSES, admission_max_queued_prefill_tokens=1, request_timeout_s=20.0, **kw
    )


def _body(text: str = "hello world, a prompt") -> dict[str, Any]:
    return {"text": text, "sampling_params": {"max_new_tokens": 4}, "stream": True}


async def _post(
    session: aiohttp.ClientSession, url: str, key: str, path: str = "/generate"
) -> tuple[int, dict[str, str], bytes]:
    body = _body() if path == "/generate" else {"model": "m", "prompt": "hello", "max_tokens": 4}
    async with session.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, dict(r.headers), await r.read()


def _tenants(rt: Any) -> dict[str, Any]:
    return rt.app[ADMIN].tenants.describe()  # type: ignore[no-any-return]


async def _cancel(task: asyncio.Task[Any]) -> None:
    """The client of `task` gives up (its connection closes)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
        await task


async def test_queued_past_the_wait_limit_gets_429_with_retry_after(engines: Any, start_router: Any) -> None:
    eng: FakeEngine = await engines(mode="hang")
    rt = await start_router(_config(worker_urls=(eng.url,)))
    await rt.wait_healthy(1)
    held = asyncio.create_task(_post(rt.session, rt.url, "key-jobs"))  # routed; never gets a first token
    await wait_until(lambda: len(eng.seen) == 1, what="first request at the engine")
    for path, openai in (("/generate", False), ("/v1/completions", True)):
        status, headers, raw = await _post(rt.session, rt.url, "key-jobs", path)
        assert status == 429
        assert int(headers["Retry-After"]) >= 1
        err = orjson.loads(raw)["error"]
        assert err["code"] == "queue_timeout" and err["type"] == "rate_limit_error"
        assert ("param" in err) is openai  # the API's own error format
    assert len(eng.seen) == 1  # the rejected ones never reached the engine
    usage = _tenants(rt)["tenants"]["jobs"]["usage"]["quick"]
    assert usage["rejected"] == {"queue_timeout": 2} and usage["queued"] == 0
    await _cancel(held)


async def test_a_queued_client_that_disconnects_leaves_at_once(engines: Any, start_router: Any) -> None:
    eng: FakeEngine = await engines(mode="hang")
    rt = await start_router(_config(worker_urls=(eng.url,)))
    await rt.wait_healthy(1)
    held = asyncio.create_task(_post(rt.session, rt.url, "key-chat"))
    await wait_until(lambda: len(eng.seen) == 1, what="first request at the engine")
    queued = asyncio.create_task(_post(rt.session, rt.url, "key-chat"))
    adm = rt.core.admission
    await wait_until(lambda: len(adm.queue) == 1, what="second request queued")
    await _cancel(queued)  # the client closes its connection
    await wait_until(lambda: len(adm.queue) == 0, timeout=3.0, what="the queue to empty")
    await wait_until(
        lambda: _tenants(rt)["tenants"]["chat"]["usage"]["interactive"]["disconnected"] == 1,
        what="the disconnect counted",
    )
    assert len(eng.seen) == 1
    # Capacity it would have had goes to the next one: free the worker, a new request is served.
    eng.mode = "ok"
    await _cancel(held)
    status, _, _ = await _post(rt.session, rt.url, "key-chat")
    assert status == 200


async def test_tenant_changed_through_the_admin_api_while_queued(engines: Any, start_router: Any) -> None:
    eng: FakeEngine = await engines(mode="hang")
    rt = await start_router(_config(worker_urls=(eng.url,)))
    await rt.wait_healthy(1)
    held = asyncio.create_task(_post(rt.session, rt.url, "key-chat"))
    await wait_until(lambda: len(eng.seen) == 1, what="first request at the engine")
    waiting = asyncio.create_task(_post(rt.session, rt.url, "key-jobs"))
    await wait_until(lambda: len(rt.core.admission.queue) == 1, what="jobs request queued")
    async with rt.session.put(
        rt.url + "/admin/tenants/jobs", json={"class": "batch", "api_keys": ["key-jobs"], "weight": 5}
    ) as r:
        assert r.status == 200
        assert (await r.json())["weight"] == 5
    async with rt.session.get(rt.url + "/admin/tenants") as r:
        listing = await r.json()
    assert listing["tenants"]["jobs"]["class"] == "batch"
    assert listing["tenants"]["jobs"]["api_keys"] == ["..."]  # keys are never shown
    assert listing["admission"]["queued"] == 1
    # Past the old class's 0.5 s limit the queued request keeps its place: nothing is lost.
    assert rt.core.admission.queue.waiting_at_or_above(0) == 1
    eng.mode = "ok"
    await _cancel(held)  # capacity frees: the queued request is routed
    status, _, _ = await asyncio.wait_for(waiting, 10)
    assert status in (200, 429)  # routed if released before its (old) deadline, else 429 + Retry-After
    # New requests of the tenant carry the new class's engine priority (batch: 0).
    status, _, _ = await _post(rt.session, rt.url, "key-jobs")
    assert status == 200
    assert orjson.loads(eng.seen[-1].body)["priority"] == 0
    await _post(rt.session, rt.url, "key-chat")
    assert orjson.loads(eng.seen[-1].body)["priority"] == 2
    async with rt.session.delete(rt.url + "/admin/tenants/jobs") as r:
        assert r.status == 200
    async with rt.session.delete(rt.url + "/admin/tenants/jobs") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_tenant"
    async with rt.session.put(rt.url + "/admin/tenants/bad", json={"class": "gold"}) as r:
        assert r.status == 400 and "unknown class 'gold'" in (await r.json())["error"]["message"]


async def test_require_api_key_and_class_lowering(engines: Any, start_router: Any) -> None:
    eng: FakeEngine = await engines()
    rt = await start_router(_config(worker_urls=(eng.url,), require_api_key=True))
    await rt.wait_healthy(1)
    status, _, raw = await _post(rt.session, rt.url, "wrong-key")
    assert status == 401 and orjson.loads(raw)["error"]["code"] == "invalid_api_key"
    hdr = {"Authorization": "Bearer key-chat", "X-Kvroute-Class": "batch"}
    async with rt.session.post(rt.url + "/generate", json=_body(), headers=hdr) as r:
        assert r.status == 200
    assert orjson.loads(eng.seen[-1].body)["priority"] == 0  # lowered to batch
    hdr = {"Authorization": "Bearer key-jobs", "X-Kvroute-Class": "interactive"}
    async with rt.session.post(rt.url + "/generate", json=_body(), headers=hdr) as r:
        assert r.status == 200
    assert orjson.loads(eng.seen[-1].body)["priority"] == 0  # never raised above its own class
    hdr = {"Authorization": "Bearer key-chat", "X-Kvroute-Class": "platinum"}
    async with rt.session.post(rt.url + "/generate", json=_body(), headers=hdr) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_class"
