"""`kvroute serve --processes N` as an operator runs it: a real supervisor process, real SO_REUSEPORT
listeners, a real Redis, a simulated fleet, every call over loopback on a fresh connection (so the
kernel spreads them over the processes)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvroute.engines.sim.fleet import SimFleet
from kvroute.router.config import ConfigError, RouterConfig
from tests.router.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> set[int]:
    """Serving processes of supervisor `pid`: live children started by multiprocessing's spawn (its
    resource tracker excluded), read from /proc."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[1]) != pid or fields[0] == "Z":
            continue
        cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            out.add(int(entry))
    return out


async def _until(pred: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


class Client:
    """Every call on a new connection: the kernel picks the process by the connection's 4-tuple."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=10)
        )

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        try:
            async with self.session.request(method, self.base + path, **kw) as resp:
                body = await (resp.json() if resp.content_type == "application/json" else resp.text())
                return resp.status, body
        except aiohttp.ClientError:
            return 0, None

    async def all_agree(self, path: str, check: Callable[[int, Any], bool], n: int = 12) -> bool:
        """`n` calls in a row pass `check` (with 2 processes, both answer among 12 but for 2**-11)."""
        for _ in range(n):
            if not check(*await self.call("GET", path)):
                return False
        return True


@pytest.fixture
def supervisor(tmp_path: Path, redis_url: str) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "kvroute", "serve", "--log-level", "warning", *args]
        with (tmp_path / "serve.log").open("wb") as log:  # the child keeps its own descriptor
            p = subprocess.Popen(cmd, cwd=ROOT, stderr=log, start_new_session=True)
        procs.append(p)
        return p

    yield start
    for p in procs:  # a failed test must not leave processes behind
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


@pytest.mark.slow
async def test_processes_share_the_port_metrics_policy_and_restart(
    supervisor: Callable[..., subprocess.Popen[bytes]], redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    async with SimFleet(2, time_scale=0.01) as fleet:
        proc = supervisor(
            "--processes", "2", "--port", str(port), "--worker-urls", *fleet.urls, "--policy", "round_robin",
            "--redis-url", redis_url, "--redis-key-prefix", f"kvroute-test-{uuid.uuid4().hex[:10]}",
            "--sync-interval-s", "0.05", "--replica-ttl-s", "0.5",
        )  # fmt: skip
        client = Client(port)
        try:
            ready = lambda s, b: s == 200  # noqa: E731
            await _until(lambda: client.all_agree("/readiness", ready), 30, "both processes ready")
            kids = _children(proc.pid)
            assert len(kids) == 2

            one_peer = lambda s, b: s == 200 and b["enabled"] and len(b["peers"]) == 1  # noqa: E731
            await _until(lambda: client.all_agree("/admin/replicas", one_peer), 10, "each to see the other")
            replica_ids: set[str] = set()
            for _ in range(40):  # two replicas answer on the one port
                status, body = await client.call("GET", "/admin/replicas")
                replica_ids.add(body["replica_id"])
            assert len(replica_ids) == 2 and all(r.endswith(("-p0", "-p1")) for r in replica_ids)

            body = {"text": "hello " * 30, "sampling_params": {"max_new_tokens": 2}}
            answers = await asyncio.gather(*(client.call("POST", "/generate", json=body) for _ in range(20)))
            assert [s for s, _ in answers] == [200] * 20

            def requests_total(status: int, text: Any) -> bool:  # every process answers the sum of all
                found = re.findall(r'^kvroute_requests_total\{[^}]*status="200"[^}]*\} (\S+)$', text, re.M)
                return status == 200 and sum(float(v) for v in found) == 20.0

            await _until(
                lambda: client.all_agree("/metrics", requests_total), 10, "metrics summed over processes"
            )

            status, info = await client.call("PUT", "/admin/policy", json={"name": "least_load"})
            assert status == 200 and info["name"] == "least_load"
            least_load = lambda s, b: s == 200 and b["name"] == "least_load"  # noqa: E731
            await _until(lambda: client.all_agree("/admin/policy", least_load), 10, "the policy in both")

            victim = min(kids)
            os.kill(victim, signal.SIGKILL)  # a crash: the supervisor starts a new process in its place

            async def replaced() -> bool:
                now = _children(proc.pid)
                return len(now) == 2 and victim not in now

            await _until(replaced, 30, "the supervisor to restart the killed process")
            await _until(lambda: client.all_agree("/readiness", ready), 30, "the new process ready")
            # the new process took the policy set before it started (stored in Redis), not its --policy
            assert await client.all_agree("/admin/policy", least_load)
            answers = await asyncio.gather(*(client.call("POST", "/generate", json=body) for _ in range(10)))
            assert [s for s, _ in answers] == [200] * 10
            assert proc.poll() is None
        finally:
            await client.session.close()
        kids = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert all(not Path(f"/proc/{k}").exists() for k in kids)  # no orphan left serving the port


@pytest.mark.slow
async def test_processes_stop_when_the_supervisor_is_killed(
    supervisor: Callable[..., subprocess.Popen[bytes]], redis_url: str
) -> None:
    """SIGKILL leaves the supervisor no chance to stop its processes; they stop by themselves (parent-death
    signal) instead of serving the port unsupervised."""
    port = free_port()
    proc = supervisor("--processes", "2", "--port", str(port), "--redis-url", redis_url)
    client = Client(port)
    try:
        await _until(lambda: client.all_agree("/liveness", lambda s, b: s == 200), 30, "both processes up")
        await _until(lambda: asyncio.sleep(0, len(_children(proc.pid)) == 2), 10, "two processes")
        kids = _children(proc.pid)
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)

        async def all_gone() -> bool:
            return not any(Path(f"/proc/{k}").exists() for k in kids)

        await _until(all_gone, 20, "the orphaned processes to exit")
        status, _ = await client.call("GET", "/liveness")
        assert status == 0  # nothing listens on the port any more
    finally:
        await client.session.close()


@pytest.mark.slow
async def test_taken_port_stops_the_start_with_a_clear_error(
    supervisor: Callable[..., subprocess.Popen[bytes]], redis_url: str, tmp_path: Path
) -> None:
    """A port held by another program (no SO_REUSEPORT) fails every process: the supervisor exits, it
    does not restart them forever."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = supervisor("--processes", "2", "--port", str(port), "--redis-url", redis_url)
        code = await asyncio.to_thread(proc.wait, 60)
    log = (tmp_path / "serve.log").read_text()
    assert code == 1, log
    assert f"cannot listen on 127.0.0.1:{port}" in log and "before listening; stopping" in log


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"processes": 2}, "needs redis_url"),
        ({"processes": 2, "redis_url": "redis://127.0.0.1:6379", "port": 0}, "needs a fixed port"),
        ({"processes": 0}, "processes must be >= 1"),
    ],
)
def test_processes_config_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RouterConfig(**kw)
