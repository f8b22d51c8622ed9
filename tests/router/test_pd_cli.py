"""PD through the real command line: `kvroute sim` (regular + 2 prefill + 2 decode) and
`kvroute serve --pd-disaggregation --prefill URL [PORT] --decode URL`, both as child processes on loopback,
stopped with SIGINT at the end (killed if they do not stop)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from kvroute.router.pd import PREFILL_WORKER_HEADER, WORKER_HEADER
from tests.router.conftest import sse_data

pytestmark = pytest.mark.slow

LONG = "The quick brown fox jumps over the lazy dog. " * 12  # ~540 byte tokens
START_S = 30.0  # bound on each process's start-up


@dataclass
class Cli:
    base: str
    regular: list[str]
    prefill: list[tuple[str, int]]
    decode: list[str]
    client: aiohttp.ClientSession


async def _stop(proc: asyncio.subprocess.Process) -> int:
    """SIGINT, then kill if it has not exited within the bound; the exit status."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


async def _drain(stream: asyncio.StreamReader, lines: list[str], found: asyncio.Future[str]) -> None:
    """Keep reading the router's log (a full pipe would block it); resolve `found` with its URL."""
    pattern = re.compile(r"kvroute listening on (http://\S+)")
    while raw := await stream.readline():
        line = raw.decode(errors="replace")
        lines.append(line)
        m = pattern.search(line)
        if m and not found.done():
            found.set_result(m.group(1))
    if not found.done():
        found.set_exception(AssertionError("kvroute serve exited before listening:\n" + "".join(lines)))


@pytest.fixture
async def cli() -> AsyncIterator[Cli]:
    exe = [sys.executable, "-m", "kvroute"]
    sim = await asyncio.create_subprocess_exec(
        *exe, "sim", "--workers", "1", "--prefill", "2", "--decode", "2", "--base-port", "0",
        "--time-scale", "0.02", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    procs = [sim]
    drain: asyncio.Task[None] | None = None
    try:
        assert sim.stdout is not None
        infos = [json.loads(await asyncio.wait_for(sim.stdout.readline(), START_S)) for _ in range(5)]
        regular = [w["url"] for w in infos if w["role"] == "null"]
        prefill = [(w["url"], w["bootstrap_port"]) for w in infos if w["role"] == "prefill"]
        decode = [w["url"] for w in infos if w["role"] == "decode"]
        (p0, port0), (p1, _) = prefill
        serve = await asyncio.create_subprocess_exec(
            *exe, "serve", "--port", "0", "--block-size", "16", "--pd-disaggregation",
            "--prefill", p0, str(port0), "--prefill", p1,  # the second one's port comes from /server_info
            "--decode", decode[0], "--decode", decode[1],
            "--worker-urls", regular[0], "--pd-local-prefill-max-tokens", "64",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        procs.append(serve)
        assert serve.stderr is not None
        log: list[str] = []
        found: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        drain = asyncio.create_task(_drain(serve.stderr, log, found))
        base = await asyncio.wait_for(found, START_S)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + START_S
            while True:  # every worker healthy (the probes run in the background)
                async with client.get(base + "/readiness") as r:
                    ready = await r.json()
                if (ready.get("healthy_prefill"), ready.get("healthy_decode")) == (2, 2) and ready[
                    "healthy_workers"
                ] == 5:
                    break
                assert loop.time() < deadline, f"router not ready: {ready}\n{''.join(log)}"
                await asyncio.sleep(0.05)
            yield Cli(base, regular, prefill, decode, client)
        assert await _stop(serve) == 0, "".join(log)
        assert await _stop(sim) == 0
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        if drain is not None:
            await asyncio.wait_for(drain, 10)


async def test_serve_cli_pd_generate_chat_stream_batch_and_local(cli: Cli) -> None:
    prefill_urls = {u for u, _ in cli.prefill}
    # the bootstrap port not given on the command line was read from the prefill's /server_info
    async with cli.client.get(cli.base + "/admin/workers") as r:
        workers = {w["url"]: w for w in (await r.json())["workers"]}
    assert {u: workers[u]["bootstrap_port"] for u, _ in cli.prefill} == dict(cli.prefill)
    sp = {"max_new_tokens": 4, "ignore_eos": True}
    chat = {
        "messages": [{"role": "system", "content": LONG}, {"role": "user", "content": "Hi."}],
        "max_tokens": 4,
    }
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/generate", {"text": LONG, "sampling_params": sp}),
        ("/generate", {"text": LONG + " again", "sampling_params": sp, "stream": True}),
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, "stream": True}),
    ]
    for path, body in cases:
        async with cli.client.post(cli.base + path, json=body) as resp:
            raw = await resp.read()
            assert resp.status == 200, (path, raw)
            assert resp.headers[PREFILL_WORKER_HEADER] in prefill_urls, path
            assert resp.headers[WORKER_HEADER] in cli.decode, path
        if body.get("stream"):
            events = sse_data(raw)
            assert events[-1] == b"[DONE]" and not any(b'"error"' in e for e in events), (path, raw)
            if path == "/generate":
                assert orjson.loads(events[-2])["meta_info"]["completion_tokens"] == 4
            else:
                assert orjson.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        else:
            out = orjson.loads(raw)
            tokens = (
                out["meta_info"]["completion_tokens"]
                if path == "/generate"
                else out["usage"]["completion_tokens"]
            )
            assert tokens == 4, (path, out)
    # a short prompt skips the prefill pool (conditional disaggregation): the regular worker alone
    async with cli.client.post(
        cli.base + "/generate", json={"text": "Hi there", "sampling_params": sp}
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers[WORKER_HEADER] == cli.regular[0] and PREFILL_WORKER_HEADER not in resp.headers
    # a 2-item batch: one pair, one room per item on both servers, a list back in item order
    batch = {"text": [LONG + " one", LONG + " two"], "sampling_params": sp}
    async with cli.client.post(cli.base + "/generate", json=batch) as resp:
        outs = await resp.json()
        assert resp.status == 200, outs
        assert resp.headers[PREFILL_WORKER_HEADER] in prefill_urls
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [4, 4]
    async with cli.client.get(cli.base + "/metrics") as r:
        text = await r.text()
    ok = re.search(r'kvroute_pd_requests_total\{mode="disaggregated",outcome="ok"\} (\S+)', text)
    local = re.search(r'kvroute_pd_requests_total\{mode="local",outcome="ok"\} (\S+)', text)
    assert ok and float(ok.group(1)) == 5 and local and float(local.group(1)) == 1
