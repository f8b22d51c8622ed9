"""Issue #18 point 8: /flush_cache needs admin access, /abort_request exists, 405 carries Allow, every
Connection header line is honoured, and `params: []` is not a policy's parameters."""

from __future__ import annotations

import asyncio

from multidict import CIMultiDict, CIMultiDictProxy

from kvroute.router.wire import forward_headers
from tests.router.conftest import test_config


async def test_flush_cache_needs_admin_access(engines, start_router) -> None:
    eng = await engines()
    r = await start_router(test_config(worker_urls=(eng.url,), admin_token="secret"))
    await r.wait_healthy(1)
    for method in ("GET", "POST"):
        async with r.session.request(method, r.url + "/flush_cache") as resp:
            assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    async with r.session.post(r.url + "/flush_cache", headers={"Authorization": "Bearer secret"}) as resp:
        assert resp.status == 200 and (await resp.json())["success"] is True


async def test_abort_request_reaches_the_worker_serving_the_rid(engines, start_router) -> None:
    eng = await engines(mode="slow_stream", chunks=3)
    other = await engines(mode="slow_stream", chunks=3)  # whichever serves it, the stream stays open
    r = await start_router(test_config(worker_urls=(eng.url, other.url)))
    await r.wait_healthy(2)
    # round_robin: the first request goes to the first registered healthy worker; find which one.
    resp = await r.session.post(r.url + "/generate", json={"text": "abc", "stream": True, "rid": "job-7"})
    await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    serving = resp.headers["X-Kvroute-Worker"]
    async with r.session.post(r.url + "/abort_request", json={"rid": "job-7"}) as ar:
        body = await ar.json()
        assert ar.status == 200 and list(body["workers"]) == [serving]
    target, idle = (eng, other) if serving == eng.url else (other, eng)
    assert target.aborts == ["job-7"] and idle.aborts == []
    resp.close()
    async with r.session.post(r.url + "/abort_request", json={}) as ar:
        assert ar.status == 400 and (await ar.json())["error"]["code"] == "missing_rid"


async def test_405_names_the_allowed_methods(start_router) -> None:
    r = await start_router(test_config())
    async with r.session.delete(r.url + "/v1/chat/completions") as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]
        err = (await resp.json())["error"]
        assert err["code"] == "method_not_allowed" and "param" in err  # OpenAI shape on /v1


def test_every_connection_header_line_is_honoured() -> None:
    h: CIMultiDict[str] = CIMultiDict()
    h.add("Connection", "keep-alive, X-Hop-A")
    h.add("Connection", "X-Hop-B")
    h.add("X-Hop-A", "1")
    h.add("X-Hop-B", "2")
    h.add("X-End", "3")
    out = forward_headers(CIMultiDictProxy(h), "X-Request-Id", "rid")
    assert "X-Hop-A" not in out and "X-Hop-B" not in out and out["X-End"] == "3"


async def test_policy_params_must_be_an_object(start_router) -> None:
    r = await start_router(test_config())
    for params in ([], "", 0, [1]):
        async with r.session.put(
            r.url + "/admin/policy", json={"name": "round_robin", "params": params}
        ) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_params", params
