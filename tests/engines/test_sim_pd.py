"""Prefill/decode disaggregation between simulated engines: pairing by bootstrap room, and timeouts."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from kvroute.engines.sim.fleet import SimFleet
from kvroute.engines.sim.pd import BootstrapRegistry, PrefilledKv
from tests.engines.conftest import FAST, generate, wait_for

TEXT = "disaggregated serving " * 20  # 440 tokens


async def test_pd_pair_serves_and_reports_prefill_cache_hits(session: aiohttp.ClientSession) -> None:
    async with SimFleet(0, prefill=1, decode=1, time_scale=FAST) as f:
        (p_url,), (d_url,) = f.prefill_urls, f.decode_urls
        async with session.get(p_url + "/server_info") as r:
            p_info = await r.json()
        async with session.get(d_url + "/server_info") as r:
            d_info = await r.json()
        assert p_info["disaggregation_mode"] == "prefill" and isinstance(
            p_info["disaggregation_bootstrap_port"], int
        )
        assert d_info["disaggregation_mode"] == "decode"
        port = p_info["disaggregation_bootstrap_port"]
        for attempt in range(2):
            pd = {
                "bootstrap_host": "127.0.0.1",
                "bootstrap_port": port,
                "bootstrap_room": random.getrandbits(63),
            }
            # The router's way: the same request to both servers at the same time.
            (ps, pr), (ds, dr) = await asyncio.gather(
                generate(session, p_url, TEXT, max_new_tokens=6, **pd),
                generate(session, d_url, TEXT, max_new_tokens=6, **pd),
            )
            assert (ps, ds) == (200, 200), (pr, dr)
            assert pr["meta_info"]["completion_tokens"] == 1  # the prefill server yields only the first token
            assert dr["meta_info"]["completion_tokens"] == 6 and dr["output_ids"][0] == pr["output_ids"][0]
            expect_cached = 0 if attempt == 0 else (len(TEXT) - 1) // 16 * 16
            assert dr["meta_info"]["cached_tokens"] == pr["meta_info"]["cached_tokens"] == expect_cached
        assert f.registry.pending() == 0
        # The decode engine never prefills: it holds no prompt pages of its own.
        assert f.engines[1].cache.tree_tokens == 0 and f.engines[0].cache.tree_tokens > 0


async def test_missing_prefill_partner_times_out_with_a_clear_error(session: aiohttp.ClientSession) -> None:
    # 2 simulated seconds = 20 ms of wall time at this scale
    async with SimFleet(0, prefill=1, decode=1, time_scale=FAST, bootstrap_timeout_s=2.0) as f:
        d_url = f.decode_urls[0]
        status, body = await generate(session, d_url, TEXT, bootstrap_room=12345)
        assert status == 500
        assert (
            "bootstrap room 12345" in body["error"]["message"] and "never arrived" in body["error"]["message"]
        )
        # streamed: the error still comes as an HTTP status, since no token was sent yet
        req = {"text": TEXT, "stream": True, "bootstrap_room": 777}
        async with session.post(d_url + "/generate", json=req) as r:
            assert r.status == 500 and "never arrived" in (await r.json())["error"]["message"]
        # a decode server needs a room at all
        status, body = await generate(session, d_url, TEXT)
        assert status == 400 and "bootstrap_room" in body["error"]["message"]
        assert f.engines[1].load().num_running_reqs == 0 and f.registry.pending() == 0


async def test_wrong_bootstrap_port_is_rejected(session: aiohttp.ClientSession) -> None:
    async with SimFleet(0, prefill=1, decode=1, time_scale=FAST) as f:
        port = f.engines[0].config.bootstrap_port
        assert port is not None
        room = {"bootstrap_room": 99}
        (ps, _), (ds, dr) = await asyncio.gather(
            generate(session, f.prefill_urls[0], TEXT, bootstrap_port=port, **room),
            generate(session, f.decode_urls[0], TEXT, bootstrap_port=port + 1, **room),
        )
        assert ps == 200 and ds == 400 and "bootstrap port" in dr["error"]["message"]


async def test_aborted_prefill_fails_its_decode_partner_at_once(session: aiohttp.ClientSession) -> None:
    async with SimFleet(0, prefill=1, decode=1, time_scale=FAST, bootstrap_timeout_s=1e4) as f:
        await f.set_faults(0, stall=True)  # the prefill engine accepts but never runs the request
        room = {"bootstrap_room": 4242, "rid": "p-1"}
        decode = asyncio.create_task(generate(session, f.decode_urls[0], TEXT, **room))
        prefill = asyncio.create_task(generate(session, f.prefill_urls[0], TEXT, **room))
        await wait_for(lambda: f.engines[0].load().num_waiting_reqs == 1, what="prefill queued")
        async with session.post(f.prefill_urls[0] + "/abort_request", json={"rid": "p-1"}) as r:
            assert r.status == 200
        (ds, dr), (ps, pr) = await asyncio.wait_for(asyncio.gather(decode, prefill), 5)
        assert ds == 500 and "prefill failed" in dr["error"]["message"]  # not a 1e4 s timeout
        assert ps == 200 and pr["meta_info"]["finish_reason"]["type"] == "abort"


def _kv(room: int) -> PrefilledKv:
    return PrefilledKv(room, None, prompt_tokens=8, cached_tokens=0, first_token=1, kv_bytes=64)


async def test_registry_drops_rooms_nobody_claims_after_the_hold() -> None:
    reg = BootstrapRegistry(hold_s=0.05)
    reg.deposit(_kv(1))  # the prefill finished; its decode never asks
    reg.fail(2, "the prefill request was aborted")  # the prefill aborted before its decode asked
    assert reg.pending() == 2
    await wait_for(lambda: reg.pending() == 0, timeout=5, what="unclaimed rooms dropped")
    # a claim within the hold takes the deposit at once and leaves nothing behind
    reg.deposit(_kv(3), hold_s=60)
    assert (await reg.claim(3, timeout_s=5)).room == 3 and reg.pending() == 0
    # a claim still waiting is never expired under it, and close() fails it cleanly instead of hanging
    waiter = asyncio.create_task(reg.claim(4, timeout_s=60))
    await wait_for(lambda: reg.pending() == 1, what="decode waiting")
    reg.deposit(_kv(5), hold_s=0.0)
    await wait_for(lambda: reg.pending() == 1, what="room 5 dropped, room 4 kept")
    reg.close()
    with pytest.raises(RuntimeError, match="stopping"):
        await asyncio.wait_for(waiter, 5)
    assert reg.pending() == 0


async def test_registry_is_empty_after_success_and_after_an_aborted_prefill(
    session: aiohttp.ClientSession,
) -> None:
    # 50 simulated seconds of decode wait = 0.5 s of wall time at this scale
    async with SimFleet(0, prefill=1, decode=1, time_scale=FAST, bootstrap_timeout_s=50.0) as f:
        (p_url,), (d_url,) = f.prefill_urls, f.decode_urls
        port = f.engines[0].config.bootstrap_port
        # success, prefill first: its deposit is held until the decode claims it
        pd = {"bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": 11}
        ps, _ = await generate(session, p_url, TEXT, max_new_tokens=4, **pd)
        assert ps == 200 and f.registry.pending() == 1
        ds, dr = await generate(session, d_url, TEXT, max_new_tokens=4, **pd)
        assert ds == 200 and dr["meta_info"]["completion_tokens"] == 4
        assert f.registry.pending() == 0
        # abort path: the prefill is aborted before its decode side asks; nobody ever asks
        await f.set_faults(0, stall=True)
        room = {"bootstrap_room": 12, "rid": "p-abort"}
        prefill = asyncio.create_task(generate(session, p_url, TEXT, **room))
        await wait_for(lambda: f.engines[0].load().num_waiting_reqs == 1, what="prefill queued")
        async with session.post(p_url + "/abort_request", json={"rid": "p-abort"}) as r:
            assert r.status == 200
        ps, pr = await asyncio.wait_for(prefill, 5)
        assert ps == 200 and pr["meta_info"]["finish_reason"]["type"] == "abort"
        assert f.registry.pending() == 1  # held for a decode that may still come
        await wait_for(lambda: f.registry.pending() == 0, timeout=5, what="aborted room dropped")
        # a stalled prefill left in flight when the fleet stops leaves nothing behind either
        left = asyncio.create_task(generate(session, p_url, TEXT, bootstrap_room=13))
        await wait_for(lambda: f.engines[0].load().num_waiting_reqs == 1, what="prefill queued")
    await asyncio.wait_for(asyncio.gather(left, return_exceptions=True), 5)
    assert f.registry.pending() == 0


async def test_batch_generate_runs_every_item_with_its_own_rid_and_room(
    session: aiohttp.ClientSession,
) -> None:
    async with SimFleet(0, prefill=1, decode=1, time_scale=FAST) as f:
        (p_url,), (d_url,) = f.prefill_urls, f.decode_urls
        body = {
            "input_ids": [[5] * 40, [7] * 50],
            "rid": "b",  # SGLang: rid_0, rid_1
            "bootstrap_room": 100,  # SGLang: room + i
            "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 3}],
        }
        (ps, pr), (ds, dr) = [
            (r.status, await r.json())
            for r in await asyncio.gather(
                session.post(p_url + "/generate", json=body), session.post(d_url + "/generate", json=body)
            )
        ]
        assert (ps, ds) == (200, 200), (pr, dr)
        assert [o["meta_info"]["id"] for o in dr] == ["b_0", "b_1"]
        assert [o["meta_info"]["completion_tokens"] for o in dr] == [2, 3]
        assert [o["meta_info"]["prompt_tokens"] for o in pr] == [40, 50]
        assert f.registry.pending() == 0
        bad = {**body, "bootstrap_room": [1, 2, 3]}
        async with session.post(d_url + "/generate", json=bad) as r:
            assert r.status == 400 and "bootstrap_room has 3 values" in (await r.json())["error"]["message"]
