"""Circuit breaker: bounded half-open probes, vetoed openings, and the fleet-wide ejection cap."""

from __future__ import annotations

import pytest

from kvroute.router.breaker import CircuitBreaker, EjectionCap


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_half_open_admits_a_bounded_number_of_probes() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, cooldown_s=5, success_threshold=2, clock=clock, max_probes=2)
    assert b.begin() == "yes"
    assert b.record_failure() and b.begin() == "no" and not b.allows()  # open: nothing admitted
    clock.t = 5.0
    assert b.begin() == "probe" and b.begin() == "probe"
    assert b.begin() == "no" and not b.allows()  # both probe slots taken
    b.end()
    assert b.allows() and b.begin() == "probe"  # a finished probe frees its slot
    b.record_success()
    assert b.state == "half_open"
    assert b.record_success() and b.begin() == "yes"  # 2 successes closed it: no slot counting now


def test_failed_probe_reopens_and_resets_the_slots() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, cooldown_s=5, success_threshold=1, clock=clock)
    b.record_failure()
    clock.t = 5.0
    assert b.begin() == "probe"
    assert b.record_failure() and b.state == "open" and b.probes == 0
    b.end()  # the failed probe's own end: never below zero
    assert b.probes == 0
    clock.t = 10.0
    assert b.begin() == "probe"


def test_vetoed_opening_stays_closed_but_a_probe_failure_always_reopens() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=2, cooldown_s=5, success_threshold=1, clock=clock)
    b.record_failure(may_open=False)
    assert not b.record_failure(may_open=False) and b.state == "closed" and b.vetoed == 1
    assert b.record_failure(may_open=True) and b.state == "open"
    clock.t = 5.0
    assert b.poll() == "half_open"
    assert b.record_failure(may_open=False) and b.state == "open"  # the cap only guards closed -> open


@pytest.mark.parametrize(
    ("cap", "ejected", "in_rotation", "allowed"),
    [
        (EjectionCap(50, 1), 0, 4, True),  # 1 of 4 out: 25% <= 50%
        (EjectionCap(50, 1), 1, 3, True),  # 2 of 4: 50%
        (EjectionCap(50, 1), 2, 2, False),  # a third of 4 would be 75%
        (EjectionCap(50, 1), 0, 1, False),  # the last worker in rotation stays
        (EjectionCap(50, 0), 0, 1, True),  # ... unless min_in_rotation is 0 (then at least one may go)
        (EjectionCap(10, 1), 0, 3, True),  # 10% of 3 rounds to 0: one may always go (Envoy)
        (EjectionCap(10, 1), 1, 2, False),  # ... but only one
        (EjectionCap(100, 2), 0, 2, False),  # min_in_rotation 2 with 2 in rotation
        (EjectionCap(100, 0), 3, 1, True),  # no cap at all
    ],
)
def test_ejection_cap(cap: EjectionCap, ejected: int, in_rotation: int, allowed: bool) -> None:
    assert cap.may_eject(ejected, in_rotation) is allowed
