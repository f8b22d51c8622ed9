"""File discovery end to end: workers appear and vanish while a request streams (nothing cut, nothing lost),
a malformed file keeps the previous set, a worker that comes back is registered again."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvroute.router.app import DISCOVERY
from kvroute.router.discovery.file import DiscoveryFileError, parse_workers, read_workers
from kvroute.router.types import WorkerRole, WorkerState
from tests.router.conftest import sse_data, test_config, wait_until


def write_atomically(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data if isinstance(data, str) else json.dumps(data))
    os.replace(tmp, path)


def test_parse_workers_forms_and_errors(tmp_path) -> None:
    snap = parse_workers(
        {
            "workers": [
                "http://a:1/",
                {"url": "http://p:2", "role": "prefill", "bootstrap_port": 8998},
                {"url": "http://d:3", "worker_type": "decode", "kv_events": "tcp://d:5557"},
            ]
        }
    )
    assert list(snap) == ["http://a:1", "http://p:2", "http://d:3"]
    assert snap["http://p:2"].role is WorkerRole.PREFILL and snap["http://p:2"].bootstrap_port == 8998
    assert snap["http://d:3"].role is WorkerRole.DECODE and snap["http://d:3"].kv_events == "tcp://d:5557"
    assert parse_workers([]) == {}
    for bad, why in [
        ({"url": "ftp://x"}, "http://"),
        ({"url": "http://x", "role": "boss"}, "role"),
        ({"url": "http://x", "bootstrap_port": 0}, "bootstrap_port"),
        ({"url": "http://x", "colour": "red"}, "unknown keys"),
        (7, "expected a URL"),
    ]:
        with pytest.raises(DiscoveryFileError, match=why):
            parse_workers([bad])
    yaml_file = tmp_path / "w.yaml"
    yaml_file.write_text("workers:\n  - url: http://y:1\n    role: decode\n")
    assert read_workers(yaml_file)["http://y:1"].role is WorkerRole.DECODE
    broken = tmp_path / "w.json"
    broken.write_text('[{"url": "http://a:1"')
    with pytest.raises(DiscoveryFileError, match="cannot parse"):
        read_workers(broken)


async def _stream(session: aiohttp.ClientSession, url: str) -> tuple[str, list[bytes]]:
    body = {"text": "hello", "stream": True, "sampling_params": {"max_new_tokens": 4}}
    async with session.post(url + "/generate", json=body) as resp:
        assert resp.status == 200
        return resp.headers["X-Kvroute-Worker"], sse_data(await resp.read())


@pytest.mark.slow
async def test_workers_appear_and_vanish_while_requests_stream(
    tmp_path, engines, start_router, caplog
) -> None:
    a = await engines(mode="slow_stream")
    b = await engines()
    listing = tmp_path / "workers.json"
    write_atomically(listing, [a.url])
    r = await start_router(
        test_config(discovery_provider="file", discovery_file=str(listing), discovery_check_interval_s=0.05)
    )
    await r.wait_healthy(1)
    assert r.registry.urls() == [a.url]

    # A request streams from A; B appears meanwhile, then A vanishes from the file.
    streaming = asyncio.create_task(_stream(r.session, r.url))
    await wait_until(lambda: r.core.load.open_tickets(a.url) == 1, what="the stream on A")
    write_atomically(listing, {"workers": [b.url]})
    await wait_until(lambda: b.url in r.registry.healthy_urls(), what="B registered")
    await wait_until(lambda: r.registry.describe(a.url)["state"] == "draining", what="A draining")
    assert a.url in r.registry.urls()  # its stream is still open: drained, not removed
    for _ in range(3):  # new requests go to B only
        worker, events = await _stream(r.session, r.url)
        assert worker == b.url and events[-1] == b"[DONE]"
    for _ in range(a.chunks):
        a.gate.put_nowait(None)
    worker, events = await streaming
    assert worker == a.url and len(events) == a.chunks + 1 and events[-1] == b"[DONE]"  # never cut
    await wait_until(lambda: a.url not in r.registry.urls(), what="A removed once idle")

    # A malformed (or half-written) file: the previous set stays, the error is logged once.
    sync = r.app[DISCOVERY]
    with caplog.at_level(logging.ERROR, logger="kvroute.discovery"):
        write_atomically(listing, '[{"url": ')
        await wait_until(lambda: sync.last_error is not None, what="the parse error")
    assert "cannot parse" in sync.last_error and "keeping the last known workers" in caplog.text
    assert r.registry.urls() == [b.url] and r.registry.describe(b.url)["state"] == WorkerState.HEALTHY.value

    # A comes back; an admin-added worker at a listed URL is left alone (not discovery's to retire).
    write_atomically(listing, [a.url, b.url])
    await wait_until(lambda: a.url in r.registry.healthy_urls(), what="A back")
    write_atomically(listing, [])
    await wait_until(lambda: not r.registry.urls(), what="all retired")
    text = await (await r.session.get(r.url + "/metrics")).text()
    assert 'kvroute_discovery_changes_total{change="retired",source="file"} 3.0' in text
    assert 'kvroute_discovery_errors_total{source="file"}' in text
