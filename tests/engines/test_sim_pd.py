"""Prefill/decode disaggregation between simulated engines: pairing by bootstrap room, and timeouts."""

from __future__ import annotations

import asyncio
import random

import aiohttp

from engines.sim.fleet import SimFleet
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
