"""The admission queue on a virtual clock: class priority first, weighted fair shares among tenants
within a class, FIFO within a tenant, deadlines; and the saturation rule (table-driven)."""

from __future__ import annotations

import pytest

from kvroute.router.admission import AdmissionQueue, Waiter
from kvroute.router.tenants.classes import BUILTIN_CLASSES, SlaClass
from kvroute.router.tenants.saturation import SaturationConfig, prefill_ahead, saturated
from kvroute.router.types import WorkerLoad

INTER, STD, BATCH = (BUILTIN_CLASSES[n] for n in ("interactive", "standard", "batch"))


def _w(
    seq: int, tenant: str, cls: SlaClass, *, weight: float = 1.0, cost: float = 100.0, at: float = 0.0
) -> Waiter:
    return Waiter(seq, tenant, weight, cls, cost, at, at + cls.max_queue_wait_s)


def _drain(q: AdmissionQueue, n: int | None = None) -> list[str]:
    """Serve the head of the highest level n times; returns 'tenant#seq' in service order."""
    out = []
    while len(q) and (n is None or len(out) < n):
        w = next(q.heads())
        q.take(w)
        out.append(f"{w.tenant}#{w.seq}")
    return out


@pytest.mark.parametrize(
    "arrivals, expected",
    [
        # class priority beats arrival order: the interactive request that came last goes first
        ([("b", BATCH), ("s", STD), ("i", INTER)], ["i#2", "s#1", "b#0"]),
        # within a class and tenant: FIFO (= deadline order, one wait limit per class)
        ([("a", BATCH), ("a", BATCH), ("a", BATCH)], ["a#0", "a#1", "a#2"]),
        # equal weights, equal costs: tenants alternate even if one queued everything first
        ([("a", BATCH)] * 3 + [("b", BATCH)] * 3, ["a#0", "b#3", "a#1", "b#4", "a#2", "b#5"]),
    ],
)
def test_order_by_class_then_fair_share(arrivals: list[tuple[str, SlaClass]], expected: list[str]) -> None:
    q = AdmissionQueue()
    for i, (tenant, cls) in enumerate(arrivals):
        q.push(_w(i, tenant, cls, at=i * 0.01))
    assert _drain(q) == expected
    assert len(q) == 0


@pytest.mark.parametrize(
    "weights, costs, served, expected_share",
    [
        ({"a": 1.0, "b": 3.0}, {"a": 100, "b": 100}, 40, {"a": 10, "b": 30}),  # 1:3 by weight
        ({"a": 1.0, "b": 1.0}, {"a": 300, "b": 100}, 40, {"a": 10, "b": 30}),  # shares are in tokens
        ({"a": 2.0, "b": 1.0}, {"a": 100, "b": 100}, 30, {"a": 20, "b": 10}),
    ],
)
def test_weighted_fair_share_within_a_class(
    weights: dict[str, float], costs: dict[str, float], served: int, expected_share: dict[str, int]
) -> None:
    q = AdmissionQueue()
    seq = 0
    for t in weights:  # both backlogged with more than will be served
        for _ in range(served):
            q.push(_w(seq, t, BATCH, weight=weights[t], cost=costs[t]))
            seq += 1
    got = _drain(q, served)
    share = {t: sum(1 for s in got if s.startswith(t + "#")) for t in weights}
    assert share == expected_share


def test_a_returning_tenant_gets_no_credit_for_its_idle_time() -> None:
    """a is served alone for a while; b arriving later competes from the current virtual time, it
    does not get all the turns a had (self-clocked fair queueing)."""
    q = AdmissionQueue()
    for i in range(5):
        q.push(_w(i, "a", BATCH))
    assert _drain(q, 4) == ["a#0", "a#1", "a#2", "a#3"]
    for i in range(10, 13):
        q.push(_w(i, "b", BATCH))
    for i in range(20, 22):
        q.push(_w(i, "a", BATCH))
    # b starts at the virtual time of a's last service (start tag 300, finish 400), not at 0: credited
    # for its idle time it would take all three turns before a#4 (finish tags 100, 200, 300 < 500).
    assert _drain(q) == ["b#10", "a#4", "b#11", "b#12", "a#20", "a#21"]


def test_expiry_and_removal_on_a_virtual_clock() -> None:
    short = SlaClass("short", priority=1, max_queue_wait_s=1.0)
    q = AdmissionQueue()
    a, b, c = _w(0, "t", short, at=0.0), _w(1, "t", short, at=0.5), _w(2, "u", BATCH, at=0.0)
    for w in (a, b, c):
        q.push(w)
    assert q.expired(0.99) == []
    assert q.expired(1.0) == [a]  # deadline = arrival + the class's wait limit
    assert {w.seq for w in q.expired(1.5)} == {0, 1}
    assert q.remove(a) and not q.remove(a)  # removed once; a second removal is a no-op
    assert len(q) == 2 and q.waiting_at_or_above(1) == 1 and q.waiting_at_or_above(0) == 2
    assert [w.seq for w in q.heads()] == [1, 2]


@pytest.mark.parametrize(
    "pending, by_prio, own, cls, engine_priority, want",
    [
        (0, {}, 50_000, BATCH, True, False),  # nothing ahead: even a huge prompt goes
        (20_000, {0: 20_000}, 12_000, BATCH, True, False),  # 32k bound not passed
        (24_000, {0: 24_000}, 12_000, BATCH, True, True),  # 36k > 32k bound
        (33_000, {0: 33_000}, 1_500, INTER, True, False),  # batch prefill is not ahead of interactive
        (33_000, {0: 33_000}, 1_500, INTER, False, True),  # ...unless engines ignore priority (bound)
        (33_000, {}, 1_500, INTER, True, True),  # unknown priority (a peer's) counts as ahead
        (34_000, {2: 34_000}, 1_000, INTER, True, True),  # ~1.0 s wait + own > 1 s SLO
        (20_000, {2: 20_000}, 1_000, INTER, True, False),  # 0.6 s: within the SLO
        (20_000, {2: 20_000}, 1_000, SlaClass("tight", 2, ttft_slo_s=0.5), True, True),
    ],
)
def test_saturation(
    pending: int, by_prio: dict[int, int], own: int, cls: SlaClass, engine_priority: bool, want: bool
) -> None:
    load = WorkerLoad(pending_prefill_tokens=pending, pending_prefill_by_priority=dict(by_prio))
    cfg = SaturationConfig(
        prefill_tokens_per_s=35_000, max_queued_prefill_tokens=32_768, engine_priority=engine_priority
    )
    assert saturated(load, own, cls, cfg) is want
    assert prefill_ahead(load, cls.priority, engine_priority) <= pending
