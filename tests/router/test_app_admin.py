"""Admin API auth and operations, and 4xx answers to malformed client input."""

from __future__ import annotations

import orjson
import pytest

from tests.router.conftest import wait_until


async def test_admin_requires_token_when_configured(engines, start_router) -> None:
    r = await start_router(admin_token="s3cret")
    async with r.session.get(r.url + "/admin/workers") as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthorized"
    async with r.session.get(r.url + "/admin/workers", headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    async with r.session.get(r.url + "/admin/workers", headers={"Authorization": "Bearer s3cret"}) as resp:
        assert resp.status == 200
        assert (await resp.json()) == {"workers": []}


async def test_admin_without_token_open_to_loopback(start_router) -> None:
    r = await start_router()
    async with r.session.get(r.url + "/admin/policy") as resp:
        assert resp.status == 200
        info = await resp.json()
    assert info["name"] == "round_robin" and "kv_aware" in info["available"]


async def test_admin_worker_lifecycle_and_policy(engines, start_router) -> None:
    eng = await engines()
    r = await start_router()
    async with r.session.post(r.url + "/admin/workers", json={"url": eng.url}) as resp:
        assert resp.status == 202
        assert (await resp.json())["worker"]["state"] in ("pending", "healthy")
    async with r.session.post(r.url + "/admin/workers", json={"url": eng.url}) as resp:
        assert resp.status == 409
    await r.wait_healthy(1)
    async with r.session.get(r.url + "/admin/workers") as resp:
        (w,) = (await resp.json())["workers"]
    assert (w["url"], w["state"], w["page_size"], w["model"]) == (eng.url, "healthy", 16, "fake-model")
    async with r.session.post(r.url + "/admin/workers/drain", json={"url": eng.url}) as resp:
        assert (await resp.json())["worker"]["state"] == "draining"
    async with r.session.post(r.url + "/generate", json={"text": "abc"}) as resp:
        assert resp.status == 503  # draining workers take no new requests
    async with r.session.post(r.url + "/admin/workers/undrain", json={"url": eng.url}) as resp:
        assert (await resp.json())["worker"]["state"] == "healthy"
    async with r.session.put(
        r.url + "/admin/policy", json={"name": "kv_aware", "params": {"nope": 1}}
    ) as resp:
        assert resp.status == 400 and "nope" in (await resp.json())["error"]["message"]
    async with r.session.put(r.url + "/admin/policy", json={"name": "least_load"}) as resp:
        assert resp.status == 200 and (await resp.json())["name"] == "least_load"
    async with r.session.post(r.url + "/admin/route/explain", json={"text": "hello " * 20}) as resp:
        ex = await resp.json()
    assert ex["decision"]["worker"] == eng.url and ex["prompt_tokens"] == 120 and ex["blocks"] == 7
    assert [s["url"] for s in ex["scores"]] == [eng.url]
    assert not eng.seen  # explain sends nothing
    async with r.session.get(r.url + "/admin/index") as resp:
        assert eng.url in (await resp.json())["workers"]
    async with r.session.get(r.url + "/admin/counters") as resp:
        assert (await resp.json())["ready"] is True
    async with r.session.delete(r.url + "/admin/workers", params={"url": eng.url}) as resp:
        assert resp.status == 200
    assert r.core.get_worker(eng.url) is None
    async with r.session.delete(r.url + "/admin/workers", params={"url": eng.url}) as resp:
        assert resp.status == 404


async def test_page_size_that_cannot_fold_is_rejected(engines, start_router) -> None:
    """Pages of 24 tokens cannot make whole 16-token router blocks (page size 1 or 8 could)."""
    eng = await engines(page_size=24)
    r = await start_router(worker_urls=(eng.url,), block_size=16)
    await wait_until(lambda: r.core.get_worker(eng.url).state.value == "rejected", what="rejection")
    async with r.session.get(r.url + "/admin/workers") as resp:
        (w,) = (await resp.json())["workers"]
    assert w["state"] == "rejected" and "page_size 24" in w["reason"] and "--block-size 16" in w["reason"]
    assert "multiple of every engine's page size" in w["reason"]
    async with r.session.get(r.url + "/readiness") as resp:
        assert resp.status == 503


GEN, CMPL, CHAT = "/generate", "/v1/completions", "/v1/chat/completions"


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        (GEN, b"{", 400, "invalid_json"),  # truncated JSON
        (GEN, b"", 400, "empty_body"),
        (GEN, b"\xff\xfe", 400, "invalid_json"),  # not UTF-8
        (GEN, b"[1, 2]", 400, "invalid_json"),  # not an object
        (GEN, b"{}", 400, "missing_prompt"),
        (GEN, b'{"text": 5}', 400, "invalid_text"),
        (GEN, b'{"text": ""}', 400, "invalid_text"),
        (GEN, b'{"input_ids": []}', 400, "invalid_input_ids"),
        (GEN, b'{"input_ids": [1, "a"]}', 400, "invalid_input_ids"),
        (GEN, b'{"input_ids": [-1]}', 400, "invalid_input_ids"),
        (GEN, b'{"text": "a", "stream": "yes"}', 400, "invalid_stream"),
        (GEN, b'{"text": "a", "sampling_params": []}', 400, "invalid_sampling_params"),
        (GEN, b'{"text": "a", "sampling_params": {"max_new_tokens": "9"}}', 400, "invalid_max_new_tokens"),
        (CMPL, b'{"prompt": 5}', 400, "invalid_prompt"),
        (CMPL, b'{"prompt": ""}', 400, "invalid_prompt"),
        (CMPL, b'{"model": "m"}', 400, "invalid_prompt"),
        (CMPL, b'{"prompt": "a", "max_tokens": "10"}', 400, "invalid_max_tokens"),
        (CMPL, b'{"prompt": "a", "model": 3}', 400, "invalid_model"),
        (CHAT, b'{"messages": []}', 400, "invalid_messages"),
        (CHAT, b'{"messages": "hi"}', 400, "invalid_messages"),
        (CHAT, b'{"messages": [{"content": "no role"}]}', 400, "invalid_messages"),
        (CHAT, b'{"messages": [{"role": "user", "content": 7}]}', 400, "invalid_messages"),
        (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "user": 1}', 400, "invalid_user"),
        (CHAT, b'{"messages": [{"role": "user", "content": "' + b"x" * 2000 + b'"}]}', 413, "body_too_large"),
    ],
)
async def test_malformed_bodies_get_4xx(engines, start_router, path, body, status, code) -> None:
    eng = await engines()
    r = await start_router(worker_urls=(eng.url,), max_body_bytes=1024)
    await r.wait_healthy(1)
    async with r.session.post(r.url + path, data=body, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == status
        err = orjson.loads(await resp.read())["error"]
    assert err["code"] == code and err["message"] and "Traceback" not in err["message"]
    assert ("param" in err) == path.startswith("/v1/")  # OpenAI shape on /v1/*, SGLang's on native routes
    assert not eng.seen  # nothing bad is forwarded


async def test_unknown_route_is_json_404(start_router) -> None:
    r = await start_router()
    async with r.session.get(r.url + "/v1/nothing") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"


async def test_pd_readiness_needs_a_healthy_prefill_and_decode(engines, start_router) -> None:
    """PD mode: a healthy prefill alone (or decode alone) is not ready: no pair could serve a request."""
    p, d = await engines(), await engines()
    r = await start_router(pd_disaggregation=True, prefill_urls=((p.url, 9001),))
    await r.wait_healthy(1)
    async with r.session.get(r.url + "/readiness") as resp:
        body = await resp.json()
        assert resp.status == 503, body
    assert body["healthy_prefill"] == 1 and body["healthy_decode"] == 0
    async with r.session.post(r.url + "/admin/workers", json={"url": d.url, "role": "decode"}) as resp:
        assert resp.status == 202
    await r.wait_healthy(2)
    async with r.session.get(r.url + "/readiness") as resp:
        body = await resp.json()
        assert resp.status == 200, body
    assert body["healthy_prefill"] == 1 and body["healthy_decode"] == 1
    async with r.session.post(r.url + "/admin/workers/drain", json={"url": p.url}) as resp:
        assert resp.status == 200
    async with r.session.get(r.url + "/readiness") as resp:
        assert resp.status == 503  # the only prefill is draining
    async with r.session.get(r.url + "/admin/counters") as resp:
        assert (await resp.json())["ready"] is False
    async with r.session.get(r.url + "/admin/replicas") as resp:
        assert resp.status == 200 and await resp.json() == {"enabled": False}
