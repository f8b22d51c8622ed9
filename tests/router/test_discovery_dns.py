"""DNS discovery against a real DNS server on loopback (a few lines of dnspython answering UDP queries from
a zone the test edits), through the real asyncio resolver: A/AAAA and SRV records, a shrinking answer, a
name that stops resolving (kept for the grace period, then gone)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kvroute.router.discovery.base import Snapshot
from kvroute.router.discovery.dns import DnsSource
from kvroute.router.discovery.sync import DiscoverySync
from kvroute.router.types import WorkerRole
from tests.router.conftest import wait_until

dns_message = pytest.importorskip("dns.message")
import dns.rcode  # noqa: E402
import dns.rdatatype  # noqa: E402
import dns.rrset  # noqa: E402


class Zone(asyncio.DatagramProtocol):
    """Answers from `records`: (name, type) -> rdata texts; NXDOMAIN for a name with no records at all."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.queries = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queries += 1
        query = dns_message.from_wire(data)
        reply = dns_message.make_response(query)
        q = query.question[0]
        name, rdtype = q.name.to_text(), dns.rdatatype.to_text(q.rdtype)
        texts = self.records.get((name, rdtype))
        if texts:
            reply.answer.append(dns.rrset.from_text_list(q.name, 5, "IN", rdtype, texts))
        elif not any(n == name for n, _ in self.records):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(reply.to_wire(), addr)


@pytest.fixture
async def zone() -> AsyncIterator[tuple[Zone, str]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Zone, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    yield proto, f"127.0.0.1:{port}"
    transport.close()


class Sink:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def publish(self, workers: Snapshot) -> None:  # pragma: no cover - resolve_all returns instead
        raise AssertionError

    def error(self, message: str) -> None:
        self.errors.append(message)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_and_aaaa_records_shrink_and_a_name_that_stops_resolving(zone) -> None:
    z, server = zone
    z.records = {
        ("workers.test.", "A"): ["127.0.0.2", "127.0.0.3"],
        ("workers.test.", "AAAA"): ["::1"],
    }
    clock = Clock()
    src = DnsSource(
        [(WorkerRole.REGULAR, "workers.test")], port=30000, grace_s=30, nameserver=server, clock=clock
    )
    sink = Sink()
    snap = await src.resolve_all(sink)
    assert sorted(snap) == ["http://127.0.0.2:30000", "http://127.0.0.3:30000", "http://[::1]:30000"]
    assert not sink.errors and z.queries == 2  # A and AAAA, asked of our server

    z.records[("workers.test.", "A")] = ["127.0.0.3"]  # an intended change: applied at once
    assert sorted(await src.resolve_all(sink)) == ["http://127.0.0.3:30000", "http://[::1]:30000"]

    z.records.clear()  # NXDOMAIN: kept for the grace period, then gone
    clock.now += 29
    assert sorted(await src.resolve_all(sink)) == ["http://127.0.0.3:30000", "http://[::1]:30000"]
    assert "NXDOMAIN" in sink.errors[-1] and "keeping its last workers" in sink.errors[-1]
    clock.now += 2
    assert await src.resolve_all(sink) == {}
    assert sink.errors[-1].endswith("(no workers)")


async def test_srv_records_give_ports_and_roles(zone) -> None:
    z, server = zone
    z.records = {
        ("_http._tcp.prefill.test.", "SRV"): ["0 50 30001 p0.test.", "0 50 30002 p1.test."],
        ("p0.test.", "A"): ["127.0.0.4"],
        ("p1.test.", "A"): ["127.0.0.5"],
        ("decode.test.", "A"): ["127.0.0.6"],
    }
    src = DnsSource(
        [(WorkerRole.PREFILL, "_http._tcp.prefill.test")], record="SRV", nameserver=server, grace_s=0
    )
    snap = await src.resolve_all(Sink())
    assert sorted(snap) == ["http://127.0.0.4:30001", "http://127.0.0.5:30002"]
    assert {w.role for w in snap.values()} == {WorkerRole.PREFILL}
    z.records.pop(("_http._tcp.prefill.test.", "SRV"))
    sink = Sink()
    assert await src.resolve_all(sink) == {} and "SRV" in sink.errors[0]  # grace 0: gone at once


class FakeRegistry:
    """Records what discovery asks of the registry (the real one is exercised by the file and
    Kubernetes end-to-end tests)."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []

    def __contains__(self, url: str) -> bool:
        return url in self.urls

    def add(
        self,
        url: str,
        role: WorkerRole = WorkerRole.REGULAR,
        kv_events: Any = None,
        bootstrap_port: Any = None,
    ):  # type: ignore[no-untyped-def]
        self.urls[url] = "healthy"
        self.calls.append(("add", url))

    def retire(self, url: str, reason: str, poll_s: float = 0.2):  # type: ignore[no-untyped-def]
        self.urls[url] = "retiring"
        self.calls.append(("retire", url))

    def retiring(self, url: str) -> bool:
        return self.urls.get(url) == "retiring"

    def undrain(self, url: str):  # type: ignore[no-untyped-def]
        self.urls[url] = "healthy"
        self.calls.append(("undrain", url))


async def test_run_feeds_the_registry_through_the_sync(zone) -> None:
    z, server = zone
    z.records = {("workers.test.", "A"): ["127.0.0.2"]}
    reg = FakeRegistry()
    reg.urls["http://127.0.0.9:80"] = "healthy"  # registered by --worker-urls: not discovery's
    sync = DiscoverySync(reg, "dns")
    src = DnsSource([(WorkerRole.REGULAR, "workers.test")], interval_s=0.01, grace_s=0, nameserver=server)
    task = asyncio.create_task(src.run(sync))
    try:
        await wait_until(lambda: ("add", "http://127.0.0.2:80") in reg.calls, what="add")
        z.records = {("workers.test.", "A"): ["127.0.0.3", "127.0.0.9"]}
        await wait_until(lambda: ("retire", "http://127.0.0.2:80") in reg.calls, what="retire")
        z.records = {("workers.test.", "A"): ["127.0.0.2", "127.0.0.3"]}
        await wait_until(lambda: ("undrain", "http://127.0.0.2:80") in reg.calls, what="undrain")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert ("add", "http://127.0.0.3:80") in reg.calls
    assert not [c for c in reg.calls if c[1] == "http://127.0.0.9:80"]  # left alone throughout
