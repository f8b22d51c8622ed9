"""The router against its own contract: schemathesis generates requests for every operation in
docs/openapi.yaml (a bounded number of examples each) and checks that none gets a 5xx and that every
answer matches the documented schema. The router and a simulated fleet run as `kvroute serve` and
`python -m kvroute.engines.sim.fleet` child processes, as in production.

Other sessions add operations to the spec as they add routes; the test needs nothing per operation.
`/readiness` and `/health_generate` are left out: 503 is their documented answer once generated admin
calls have removed or drained the workers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from kvroute.engines.sim.fleet import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ST = Path(sys.executable).with_name("st")
EXAMPLES = 3  # per operation and phase: bounded, CI-sized


@pytest.fixture
async def served_router():
    fleet = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvroute.engines.sim.fleet", "--workers", "2", "--base-port", "0",
        "--profile", "tiny",
        "--time-scale", "0.01", "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        cwd=REPO,
    )  # fmt: skip
    router = None
    try:
        assert fleet.stdout is not None
        urls = [json.loads(await asyncio.wait_for(fleet.stdout.readline(), 60))["url"] for _ in range(2)]
        port = free_port()
        router = subprocess.Popen(
            [sys.executable, "-m", "kvroute.router.cli", "serve", "--port", str(port),
             "--policy", "round_robin",
             "--worker-urls", *urls, "--log-level", "error"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as s:
            while True:
                assert router.poll() is None, f"kvroute serve exited with {router.returncode}"
                try:
                    async with s.get(url + "/readiness") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "router not ready"
                await asyncio.sleep(0.2)
        yield url
    finally:
        if router is not None:
            router.terminate()
            router.wait(30)
        fleet.kill()
        await fleet.wait()


@pytest.mark.skipif(not ST.exists() and shutil.which("st") is None, reason="schemathesis not installed")
async def test_every_documented_operation_conforms(served_router, tmp_path: Path) -> None:
    st = str(ST) if ST.exists() else "st"
    proc = await asyncio.create_subprocess_exec(
        st, "run", str(REPO / "docs" / "openapi.yaml"), "--url", served_router,
        "--max-examples", str(EXAMPLES), "--phases", "examples,fuzzing", "--generation-deterministic",
        "--checks", "not_a_server_error,response_schema_conformance", "--request-timeout", "20",
        "--exclude-path", "/readiness", "--exclude-path", "/health_generate", "--no-color",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # its .schemathesis/ cache goes there, not into the repository
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 280)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "Tested:" in text
