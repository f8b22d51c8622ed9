"""Admission control: route now, wait in the router's queue, or 429 with Retry-After.

A request is routed at once when some candidate worker is not saturated for it
(`kvroute.router.tenants.saturation`) and no request of its priority or higher is already waiting. Otherwise
it waits in `AdmissionQueue`: ordered by class priority, then within a priority level by weighted
fair queueing over tenants (self-clocked: a tenant's tag grows by cost / weight per request served;
ties go to the earlier deadline), FIFO within a tenant. Capacity frees when a ticket reaches its first
token or finishes (`Router.released_hooks`), when a worker joins or turns healthy (`Router.ready_hooks`:
a new engine takes the backlog at once), and on a short tick while the queue is not empty (engine
load polls, other replicas' load); the queue is then pumped: a waiter is routed when it is released,
on the load as it is then. In PD mode (a `Chooser`, `pd.fanout.admission_chooser`) the saturation is
judged on the prefill pool and the (prefill, decode) pair is chosen at release: late binding.
Past its class's `max_queue_wait_s` (or with the queue full) a waiter gets `Rejected` (the HTTP
layer's 429 + Retry-After); a cancelled waiter (client gone) leaves at once.

Invariants: every waiter ends exactly one way (routed, rejected, cancelled); a pump grants one waiter
per loop iteration, so the granted request reserves its load (`Router.on_routed`, synchronous after
the grant) before the next one is judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvroute.router.policies.base import NoWorkerAvailable
from kvroute.router.tenants.classes import SlaClass
from kvroute.router.tenants.errors import Rejected
from kvroute.router.tenants.identity import Identity
from kvroute.router.tenants.saturation import SaturationConfig, saturated
from kvroute.router.tenants.table import Tenant, TenantTable
from kvroute.router.tenants.usage import Outcome, UsageBook
from kvroute.router.types import Decision, RoutingRequest, Worker

log = logging.getLogger("kvroute.admission")


class QuotaLease(Protocol):
    """What a quota check hands back; released once when the request ends."""

    def release(self) -> None: ...


class QuotaGate(Protocol):
    async def acquire(self, tenant: Tenant, tokens: int, request_id: str) -> QuotaLease:
        """Raise `Rejected` when `tenant` is over one of its limits."""
        ...


@dataclass(frozen=True)
class AdmissionConfig:
    saturation: SaturationConfig = field(default_factory=SaturationConfig)
    max_queue: int = 4096  # requests waiting in the router queue (all classes); 429 past it; 0 = no queue
    tick_s: float = 0.05  # seconds between queue re-checks while it is not empty (load polls, peers)


Full = Callable[[Worker], bool]
"""Whether a worker is saturated for the request being judged (`saturation.saturated` bound to it)."""
Chooser = Callable[[RoutingRequest, Full, bool], Any]
"""A route for the request among the workers not `Full`, or None when every one it needs is full;
the flag `behind`: requests of its priority are already waiting, so only a route that takes nothing
they wait for may go (PD: a prompt served locally). PD mode plugs `pd.fanout.admission_chooser` in
(the PREFILL pool is judged and the pair re-selected at release); without one, admission picks a
regular worker with the router's policy."""


@dataclass(eq=False)
class Waiter:
    """One queued request. `cost`: prompt + max_tokens tokens (the fair-queueing unit)."""

    seq: int
    tenant: str
    weight: float
    sla_class: SlaClass
    cost: float
    enqueued_at: float
    deadline: float
    request: Any = None  # the RoutingRequest (opaque to the queue)
    future: asyncio.Future[Any] | None = None  # a Decision, or the chooser's route
    granted: bool = False  # set by the pump; until its task resumes no other waiter is granted


class _Flow:
    """One tenant's requests at one priority level. `start`: the head's start tag, fixed when it
    became the head (start-time fair queueing); `finish`: the last served request's finish tag."""

    __slots__ = ("queue", "start", "finish")

    def __init__(self) -> None:
        self.queue: deque[Waiter] = deque()
        self.start = 0.0
        self.finish = 0.0


class _Level:
    """One priority level: tenants' flows and the level's virtual time (start tag last served)."""

    __slots__ = ("flows", "vtime")

    def __init__(self) -> None:
        self.flows: dict[str, _Flow] = {}
        self.vtime = 0.0

    @staticmethod
    def tag(flow: _Flow) -> float:
        """The head's finish tag: its start plus its cost over the tenant's weight."""
        head = flow.queue[0]
        return flow.start + head.cost / head.weight

    def pick(self) -> Waiter | None:
        best: tuple[float, float, int] | None = None
        out = None
        for flow in self.flows.values():
            if flow.queue:
                h = flow.queue[0]
                key = (self.tag(flow), h.deadline, h.seq)
                if best is None or key < best:
                    best, out = key, h
        return out


class AdmissionQueue:
    """The router's queue (pure: no I/O, no clock of its own; tests drive it with a virtual one)."""

    def __init__(self) -> None:
        self._levels: dict[int, _Level] = {}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def push(self, w: Waiter) -> None:
        level = self._levels.setdefault(w.sla_class.priority, _Level())
        flow = level.flows.get(w.tenant)
        if flow is None:
            flow = level.flows[w.tenant] = _Flow()
        if not flow.queue:  # a new head: it starts now, or after its tenant's last request
            flow.start = max(level.vtime, flow.finish)
        flow.queue.append(w)
        self._n += 1

    def heads(self) -> Iterator[Waiter]:
        """The next waiter of each priority level, highest priority first."""
        for prio in sorted(self._levels, reverse=True):
            w = self._levels[prio].pick()
            if w is not None:
                yield w

    def waiting_at_or_above(self, priority: int) -> int:
        return sum(len(f.queue) for p, lv in self._levels.items() if p >= priority for f in lv.flows.values())

    def take(self, w: Waiter) -> None:
        """Serve `w` (a head from `heads`): advance its tenant's tag and the level's virtual time."""
        level = self._levels[w.sla_class.priority]
        flow = level.flows[w.tenant]
        level.vtime = max(level.vtime, flow.start)
        flow.finish = level.tag(flow)
        flow.queue.popleft()
        flow.start = flow.finish  # the next head starts where this one finished
        self._n -= 1
        self._tidy(w.sla_class.priority, w.tenant)

    def remove(self, w: Waiter) -> bool:
        """Take `w` out without serving it (timed out, cancelled). False if it was not queued."""
        level = self._levels.get(w.sla_class.priority)
        flow = level.flows.get(w.tenant) if level is not None else None
        if level is None or flow is None:
            return False
        was_head = bool(flow.queue) and flow.queue[0] is w
        try:
            flow.queue.remove(w)
        except ValueError:
            return False
        if was_head:
            flow.start = max(level.vtime, flow.finish)
        self._n -= 1
        self._tidy(w.sla_class.priority, w.tenant)
        return True

    def expired(self, now: float) -> list[Waiter]:
        return [
            w for lv in self._levels.values() for f in lv.flows.values() for w in f.queue if w.deadline <= now
        ]

    def waiters(self) -> Iterator[Waiter]:
        for lv in self._levels.values():
            for f in lv.flows.values():
                yield from f.queue

    def _tidy(self, prio: int, tenant: str) -> None:
        """Forget an empty flow once it holds no credit (its tag is behind the level's clock)."""
        level = self._levels[prio]
        flow = level.flows[tenant]
        if not flow.queue and flow.finish <= level.vtime:
            del level.flows[tenant]
        if not level.flows:
            del self._levels[prio]


@dataclass(eq=False)
class Grant:
    """An admitted request: where to send it and what admission knows of it. The proxy (or a library
    user) routes to `decision`, passes `priority` to `Router.on_routed`, and reports what it saw with
    `observe` before the context manager exits."""

    tenant: Tenant
    sla_class: SlaClass
    decision: Decision
    queue_wait_s: float  # seconds in the admission queue (0: routed at once); a request phase
    tokens: int  # prompt + max_tokens, as charged to the tenant's token quota
    lease: QuotaLease | None = None
    route: Any = None  # with a chooser (PD): its route (a `PDRoute`); `decision` is then its prefill's
    ttft_s: float | None = None
    itl_s: list[tuple[float, int]] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    status: int = 0

    @property
    def priority(self) -> int:
        return self.sla_class.priority

    def observe(
        self,
        status: int,
        ttft_s: float | None,
        itl_gaps: list[tuple[float, int]] | tuple[()] = (),
        prompt_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        self.status = status
        self.ttft_s = ttft_s
        self.itl_s = list(itl_gaps)
        self.prompt_tokens = prompt_tokens or 0
        self.output_tokens = output_tokens or 0


def _granted(fut: asyncio.Future[Any]) -> bool:
    return fut.done() and not fut.cancelled() and fut.exception() is None


class Admission:
    """The router's admission control over one `Router` (reads its load, never keeps its own)."""

    def __init__(
        self,
        router: Any,
        table: TenantTable,
        config: AdmissionConfig | None = None,
        quotas: QuotaGate | None = None,
        usage: UsageBook | None = None,
        clock: Callable[[], float] = time.monotonic,
        chooser: Chooser | None = None,
    ) -> None:
        self.router = router
        self.chooser = chooser
        self.table = table
        self.config = config or AdmissionConfig()
        self.quotas = quotas
        self.usage = usage if usage is not None else UsageBook()
        self.clock = clock
        self.queue = AdmissionQueue()
        self._seq = itertools.count()
        self._pump_scheduled = False
        self._in_transit = 0  # waiters granted whose task has not resumed yet (their load is unreserved)
        self._ticker: asyncio.Task[None] | None = None
        self._grant_rate = 0.0  # grants per second out of the queue (EWMA), for Retry-After
        self._last_grant = clock()
        router.released_hooks.append(self._on_released)
        # A worker that joins (registered, healthy again) takes waiters at once: an event, not the tick.
        self._ready_hooks: list[Callable[[Worker], None]] | None = getattr(router, "ready_hooks", None)
        if self._ready_hooks is not None:
            self._ready_hooks.append(self._on_ready)

    # --- configuration ------------------------------------------------------------------------

    def set_table(self, table: TenantTable) -> None:
        """Swap the tenants (admin API, shared config). Queued requests keep the class they were
        admitted with; a changed weight applies to what they are charged from now on."""
        self.table = table
        for w in self.queue.waiters():
            t = table.tenants.get(w.tenant)
            if t is not None:
                w.weight = t.weight
        self.kick()

    # --- the library API -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admit(
        self, request: RoutingRequest, identity: Identity, request_id: str = ""
    ) -> AsyncIterator[Grant]:
        """Wait for capacity (or raise `Rejected` / `NoWorkerAvailable`); release on exit."""
        grant = await self.acquire(request, identity, request_id)
        try:
            yield grant
        finally:
            self.release(grant)

    async def acquire(self, request: RoutingRequest, identity: Identity, request_id: str = "") -> Grant:
        tenant, cls = identity.tenant, identity.sla_class
        tokens = request.prompt_tokens + (request.expected_output_tokens or 0)
        usage = self.usage.of(tenant.name, cls.name)
        lease: QuotaLease | None = None
        if self.quotas is not None:
            try:
                lease = await self.quotas.acquire(tenant, tokens, request_id)
            except Rejected as exc:
                usage.count(Outcome.REJECTED, exc.reason)
                raise
        try:
            t0 = self.clock()
            decision = None
            if not self.queue.waiting_at_or_above(cls.priority):
                decision = self._try_route(request, cls)
            elif self.chooser is not None:  # PD: a prompt served locally does not queue behind
                decision = self._try_route(request, cls, behind=True)
            wait = 0.0
            if decision is None:
                decision = await self._wait(request, tenant, cls, tokens, t0, usage)
                wait = self.clock() - t0
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        usage.admitted(wait)
        if isinstance(decision, Decision):
            return Grant(tenant, cls, decision, wait, tokens, lease)
        route = decision  # the chooser's (PD): the prefill side's decision, else the local worker's
        first = route.prefill_decision if route.prefill_decision is not None else route.decode_decision
        return Grant(tenant, cls, first, wait, tokens, lease, route=route)

    def release(self, grant: Grant) -> None:
        """The request ended (any way): give back its quota and record its outcome."""
        if grant.lease is not None:
            grant.lease.release()
            grant.lease = None
        self.usage.of(grant.tenant.name, grant.sla_class.name).finished(grant)
        self.kick()

    # --- queueing -------------------------------------------------------------------------------

    async def _wait(
        self, request: RoutingRequest, tenant: Tenant, cls: SlaClass, tokens: int, t0: float, usage: Any
    ) -> Any:
        cap = self.config.max_queue
        if cls.max_queue_wait_s <= 0 or not cap:
            usage.count(Outcome.REJECTED, "no_queue")
            raise Rejected(
                f"every worker is saturated for class {cls.name!r}, which does not queue",
                "no_queue",
                self._retry_after(cls),
            )
        if len(self.queue) >= cap:
            usage.count(Outcome.REJECTED, "queue_full")
            raise Rejected(
                f"the router queue is full ({cap} requests waiting)", "queue_full", self._retry_after(cls)
            )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        w = Waiter(next(self._seq), tenant.name, tenant.weight, cls, float(max(1, tokens)), t0,
                   t0 + cls.max_queue_wait_s, request, fut)  # fmt: skip
        self.queue.push(w)
        usage.queued += 1
        self._ensure_ticker()
        try:
            async with asyncio.timeout(max(0.0, w.deadline - self.clock())):
                return await fut
        except TimeoutError:
            if _granted(fut):
                return fut.result()  # granted in the instant it expired: take the grant
            usage.count(Outcome.REJECTED, "queue_timeout")
            raise Rejected(
                f"waited {cls.max_queue_wait_s:g} s (the limit of class {cls.name!r}) for a worker "
                "with room for this request",
                "queue_timeout",
                self._retry_after(cls),
            ) from None
        except asyncio.CancelledError:
            if not _granted(fut):
                usage.count(Outcome.DISCONNECTED, "")
            raise
        finally:
            usage.queued -= 1
            self.queue.remove(w)
            if w.granted:
                self._in_transit -= 1
            if not fut.done():
                fut.cancel()
            # Pumped after this task step: a granted request reserves its load first (the caller
            # routes it before its next await), a request that left hands its turn on.
            self.kick()

    def _try_route(self, request: RoutingRequest, cls: SlaClass, behind: bool = False) -> Any:
        """A decision among the workers not saturated for this request, or None if all are (with a
        chooser: its route, or None). NoWorkerAvailable (no routable worker at all) propagates."""
        cfg = self.config.saturation
        own = request.prompt_tokens
        if self.chooser is not None:
            return self.chooser(request, lambda w: saturated(w.load, own, cls, cfg), behind)
        cands = self.router.candidates(request)
        if not cands:
            return self.router.select(request)  # raises NoWorkerAvailable
        full = [w.url for w in cands if saturated(w.load, own, cls, cfg)]
        if len(full) == len(cands):
            return None
        return self.router.select(request, exclude=full)

    def _retry_after(self, cls: SlaClass) -> float:
        """Seconds until a retry has a fair chance: the queue ahead at the recent grant rate."""
        ahead = self.queue.waiting_at_or_above(cls.priority) + 1
        rate = self._grant_rate
        est = ahead / rate if rate > 0.05 else cls.max_queue_wait_s or 1.0
        return min(max(1.0, est), 300.0)

    # --- releasing ------------------------------------------------------------------------------

    def _on_released(self, ticket: Any) -> None:
        if len(self.queue):
            self.kick()

    def _on_ready(self, worker: Worker) -> None:
        if len(self.queue):
            self.kick()

    def kick(self) -> None:
        """Pump the queue soon (coalesced: one pump per loop iteration at most)."""
        if self._pump_scheduled or not len(self.queue):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._pump_scheduled = True
        loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Grant the first head (highest priority first) that some worker has room for. Lower levels
        go only when the engines schedule by priority (else they would delay the waiting higher ones)."""
        self._pump_scheduled = False
        if self._in_transit:
            return  # the granted waiter kicks again once it has reserved its load
        try:
            for w in self.queue.heads():
                try:
                    decision = self._try_route(w.request, w.sla_class)
                except NoWorkerAvailable:
                    decision = None
                if decision is not None:
                    self.queue.take(w)
                    assert w.future is not None
                    if not w.future.done():
                        w.future.set_result(decision)
                        w.granted = True
                        self._in_transit += 1
                        self._note_grant()
                    else:
                        self.kick()
                    return
                if not self.config.saturation.engine_priority:
                    return
        except Exception:  # a bug here must not strand the queue: the ticker pumps again
            log.exception("admission pump failed")

    def _note_grant(self) -> None:
        now = self.clock()
        dt = max(1e-3, now - self._last_grant)
        self._last_grant = now
        a = min(1.0, dt / 5.0)  # ~5 s memory
        self._grant_rate = (1 - a) * self._grant_rate + a * (1.0 / dt)

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="kvroute-admission")

    async def _tick(self) -> None:
        while len(self.queue):
            await asyncio.sleep(self.config.tick_s)
            self.kick()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._on_released in self.router.released_hooks:
            self.router.released_hooks.remove(self._on_released)
        if self._ready_hooks is not None and self._on_ready in self._ready_hooks:
            self._ready_hooks.remove(self._on_ready)

    def status(self) -> dict[str, Any]:
        return {
            "queued": len(self.queue),
            "queued_by_class": self._queued_by_class(),
            "grant_rate_per_s": round(self._grant_rate, 3),
        }

    def _queued_by_class(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.queue.waiters():
            out[w.sla_class.name] = out.get(w.sla_class.name, 0) + 1
        return out
