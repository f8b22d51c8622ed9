"""Late binding of prefill in PD mode, over real HTTP on loopback: admission holds a request in the
router while every prefill worker is full (here: one request with no prefill answer yet fills a
worker, bound 1 token), and chooses the pair when it releases it, so a prefill worker that joins later
takes the backlog. Scripted engines: a prefill engine in "hang" mode never answers, so its load stays."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import aiohttp
import orjson

from kvroute.router.app import ADMIN
from kvroute.router.pd import PREFILL_WORKER_HEADER, WORKER_HEADER
from tests.router.conftest import FakeEngine, test_config, wait_until

LONG = "The quick brown fox jumps over the lazy dog. " * 12
CLASSES = {"quick": {"priority": 1, "max_queue_wait_s": 0.3, "ttft_slo_s": 5.0}}
TENANTS = {"jobs": {"class": "quick", "api_keys": ["key-jobs"]}}


def _config(prefill: FakeEngine, decode: FakeEngine, **kw: Any) -> Any:
    return test_config(
        pd_disaggregation=True,
        prefill_urls=((prefill.url, None),),
        decode_urls=(decode.url,),
        admission=True,
        admission_max_queued_prefill_tokens=1,
        tenants=TENANTS,
        classes=CLASSES,
        request_timeout_s=20.0,
        **kw,
    )


async def _post(
    session: aiohttp.ClientSession, url: str, text: str = LONG, path: str = "/generate", key: str = ""
) -> tuple[int, dict[str, str], bytes]:
    if path == "/generate":
        body: dict[str, Any] = {"text": text, "sampling_params": {"max_new_tokens": 4}, "stream": True}
    else:
        body = {"model": "m", "prompt": text, "max_tokens": 4}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.post(url + path, json=body, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
        await task


async def _held(rt: Any, prefill: FakeEngine, decode: FakeEngine) -> asyncio.Task[Any]:
    """A first request that fills the only prefill worker for good (both engines hang on it)."""
    task = asyncio.create_task(_post(rt.session, rt.url))
    await wait_until(lambda: len(prefill.seen) == 1 and len(decode.seen) == 1, what="first request sent")
    return task


async def test_queued_requests_go_to_a_prefill_worker_added_later(engines: Any, start_router: Any) -> None:
    p1: FakeEngine = await engines(mode="hang")
    dec: FakeEngine = await engines(mode="hang")
    rt = await start_router(_config(p1, dec))
    await rt.wait_healthy(2)
    adm = rt.core.admission
    # No periodic re-check: only the events (a worker joining, a prefill answered) may release waiters.
    adm.config = dataclasses.replace(adm.config, tick_s=3600.0)
    held = await _held(rt, p1, dec)
    dec.mode = "ok"
    waiting = [asyncio.create_task(_post(rt.session, rt.url, f"{LONG} #{i}")) for i in range(3)]
    await wait_until(lambda: len(adm.queue) == 3, what="three requests queued")
    assert len(p1.seen) == 1 and len(dec.seen) == 1  # nothing more went to the engines
    p2: FakeEngine = await engines()
    async with rt.session.post(rt.url + "/admin/workers", json={"url": p2.url, "role": "prefill"}) as r:
        assert r.status == 202, await r.text()
    results = await asyncio.wait_for(asyncio.gather(*waiting), 10)
    for status, headers, raw in results:
        assert status == 200, raw
        assert headers[PREFILL_WORKER_HEADER] == p2.url  # the new worker took the backlog
        assert headers[WORKER_HEADER] == dec.url
        assert raw.rstrip().endswith(b"data: [DONE]")
    assert sorted(orjson.loads(s.body)["text"] for s in p2.seen) == sorted(f"{LONG} #{i}" for i in range(3))
    assert len(p1.seen) == 1 and len(adm.queue) == 0
    usage = rt.app[ADMIN].tenants.describe()["tenants"]["default"]["usage"]["standard"]
    assert usage["rejected"] == {} and usage["queued"] == 0 and usage["completed"] == 3
    await _cancel(held)
    await wait_until(lambda: all(w.load.in_flight == 0 for w in rt.core.workers()), what="loads released")


async def test_past_the_queue_bound_or_the_wait_limit_429_with_retry_after(
    engines: Any, start_router: Any
) -> None:
    p1: FakeEngine = await engines(mode="hang")
    dec: FakeEngine = await engines(mode="hang")
    rt = await start_router(_config(p1, dec, admission_max_queue=1))
    await rt.wait_healthy(2)
    held = await _held(rt, p1, dec)
    queued = asyncio.create_task(_post(rt.session, rt.url))
    await wait_until(lambda: len(rt.core.admission.queue) == 1, what="one request queued")
    for path, openai in (("/generate", False), ("/v1/completions", True)):
        status, headers, raw = await _post(rt.session, rt.url, path=path)
        assert status == 429, raw
        assert int(headers["Retry-After"]) >= 1
        err = orjson.loads(raw)["error"]
        assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
        assert ("param" in err) is openai  # the route's own error format
    await _cancel(queued)
    await wait_until(lambda: len(rt.core.admission.queue) == 0, what="the queue to empty")
    status, headers, raw = await _post(rt.session, rt.url, key="key-jobs")  # waits 0.3 s at most
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert orjson.loads(raw)["error"]["code"] == "queue_timeout"
    assert len(p1.seen) == 1 and len(dec.seen) == 1  # the rejected ones never reached an engine
    usage = rt.app[ADMIN].tenants.describe()["tenants"]
    assert usage["default"]["usage"]["standard"]["rejected"] == {"queue_full": 2}
    assert usage["default"]["usage"]["standard"]["disconnected"] == 1
    assert usage["jobs"]["usage"]["quick"]["rejected"] == {"queue_timeout": 1}
    await _cancel(held)


async def test_a_queued_client_that_disconnects_leaves_and_the_next_is_served(
    engines: Any, start_router: Any
) -> None:
    p1: FakeEngine = await engines(mode="hang")
    dec: FakeEngine = await engines(mode="hang")
    rt = await start_router(_config(p1, dec))
    await rt.wait_healthy(2)
    adm = rt.core.admission
    held = await _held(rt, p1, dec)
    gone = asyncio.create_task(_post(rt.session, rt.url, "the client that leaves " * 20))
    await wait_until(lambda: len(adm.queue) == 1, what="request queued")
    await _cancel(gone)
    await wait_until(lambda: len(adm.queue) == 0, what="the queue to empty")
    assert len(p1.seen) == 1 and len(dec.seen) == 1
    p1.mode = dec.mode = "ok"
    nxt = asyncio.create_task(_post(rt.session, rt.url))
    await wait_until(lambda: len(adm.queue) == 1, what="next request queued")
    await _cancel(held)  # the prefill worker frees: the queued request is released to it
    status, headers, raw = await asyncio.wait_for(nxt, 10)
    assert status == 200, raw
    assert headers[PREFILL_WORKER_HEADER] == p1.url
    assert orjson.loads(p1.seen[-1].body)["priority"] == 1  # the class priority reaches the engines


async def test_a_short_prompt_is_served_locally_while_the_prefill_pool_is_full(
    engines: Any, start_router: Any
) -> None:
    p1: FakeEngine = await engines(mode="hang")
    dec: FakeEngine = await engines(mode="hang")
    local: FakeEngine = await engines()
    rt = await start_router(_config(p1, dec, worker_urls=(local.url,), pd_local_prefill_max_tokens=64))
    await rt.wait_healthy(3)
    held = await _held(rt, p1, dec)
    waiting = asyncio.create_task(_post(rt.session, rt.url, LONG * 4))  # too long to serve locally
    await wait_until(lambda: len(rt.core.admission.queue) == 1, what="long request queued")
    status, headers, raw = await _post(rt.session, rt.url, "hi")
    assert status == 200, raw
    assert headers[WORKER_HEADER] == local.url and PREFILL_WORKER_HEADER not in headers
    assert len(rt.core.admission.queue) == 1 and not waiting.done()  # the long one still waits
    await _cancel(waiting)
    await _cancel(held)
