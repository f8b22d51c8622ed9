"""`Router.admit` in-process: the same admission without the HTTP server (real Admission, real load)."""

from __future__ import annotations

import asyncio

import pytest

from kvroute import Router
from kvroute.router.admission import AdmissionConfig
from kvroute.router.tenants import Rejected, TenantTable
from kvroute.router.tenants.saturation import SaturationConfig
from kvroute.router.types import Worker, WorkerState

TABLE = TenantTable.from_config(
    {"chat": {"class": "interactive"}, "docs": {"class": "batch"}},
    {"batch": {"max_queue_wait_s": 5}, "interactive": {"max_queue_wait_s": 0.2}},
)


def _router() -> Router:
    r = Router(block_size=16, policy="least_load")
    r.add_worker(Worker("http://w0", state=WorkerState.HEALTHY))
    # One request in prefill fills the worker for everyone; engines ignore priorities (strict order).
    r.enable_admission(
        TABLE, AdmissionConfig(SaturationConfig(max_queued_prefill_tokens=1, engine_priority=False))
    )
    return r


async def test_queued_requests_go_by_class_when_capacity_frees() -> None:
    r = _router()
    req = r.routing_request(text="x" * 64, max_tokens=8)
    async with r.admit(req, tenant="docs") as g0:
        t0 = r.on_routed(g0.decision, req, priority=g0.priority)
        assert g0.queue_wait_s == 0 and g0.sla_class.name == "batch"
        served: list[str] = []

        async def one(tenant: str) -> None:
            async with r.admit(req, tenant=tenant) as g:
                served.append(tenant)
                t = r.on_routed(g.decision, req, priority=g.priority)  # before the next await
                await asyncio.sleep(0)
                r.on_finished(t)

        batch = asyncio.create_task(one("docs"))
        await asyncio.sleep(0.01)
        chat = asyncio.create_task(one("chat"))  # came later, higher class
        await asyncio.sleep(0.01)
        assert len(r.admission.queue) == 2 and served == []
        r.on_first_token(t0)  # the prefill is done: capacity frees, the queue is pumped
        await asyncio.wait_for(asyncio.gather(batch, chat), 5)
        assert served == ["chat", "docs"]
        r.on_finished(t0)


async def test_admit_rejects_past_the_class_wait_limit() -> None:
    r = _router()
    req = r.routing_request(text="x" * 64)
    async with r.admit(req, tenant="docs") as g0:
        t0 = r.on_routed(g0.decision, req, priority=g0.priority)
        with pytest.raises(Rejected) as info:
            async with r.admit(req, tenant="chat"):
                pass
        assert info.value.reason == "queue_timeout" and info.value.retry_after_s >= 1
        assert len(r.admission.queue) == 0
        r.on_finished(t0)
    with pytest.raises(RuntimeError, match="already"):
        r.enable_admission(TABLE)
