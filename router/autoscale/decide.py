"""When to act on a plan: min/max per pool, cooldowns and hysteresis. Pure functions and small state.

The planner (`kvroute.router.planner`) says how many workers the load needs now; acting on every change would
flap around a boundary and pay for engines that start only to be stopped. So:
- below `min` or above `max`: go to the bound at once (configuration wins over cooldowns);
- up: the plan for the observed load asks for more than the pool has, and the pool has not changed for
  `up_cooldown_s` (new engines need that long to start and to show up in the measurements);
- down: the plan for the load *plus a hysteresis margin* (`request_rate x (1 + hysteresis)`) asks for
  fewer, for `down_intervals` decisions in a row, and the pool has not changed for `down_cooldown_s`;
  the pool then shrinks by at most `max_step_down`, never below the largest count those decisions asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kvroute.router.types import WorkerRole

Action = Literal["up", "down", "hold"]


@dataclass(frozen=True)
class PoolLimits:
    """Bounds of one pool, in workers. `min` >= 0 and `max` >= `min`."""

    min: int = 1
    max: int = 8

    def clamp(self, n: int) -> int:
        return max(self.min, min(self.max, n))


@dataclass(frozen=True)
class DecisionRules:
    """Cooldowns in seconds (0 = none); `hysteresis` as a fraction of the request rate (0 = none)."""

    up_cooldown_s: float = 30.0
    down_cooldown_s: float = 120.0
    hysteresis: float = 0.2
    down_intervals: int = 3  # consecutive decisions that must ask for fewer workers before one is removed
    max_step_down: int = 1  # workers removed from a pool per decision (>= 1)


@dataclass
class PoolState:
    """What one pool's decisions remember between intervals (owned by the loop)."""

    last_change_at: float | None = None
    down_streak: int = 0  # consecutive decisions whose margin plan asked for fewer workers
    down_floor: int = 0  # the largest count those decisions asked for


@dataclass(frozen=True)
class Decision:
    """One pool's decision at one interval: what, from and to how many, and why (for log, metrics, admin)."""

    pool: WorkerRole
    action: Action
    current: int
    target: int
    reason: str
    at: float  # the loop's clock (monotonic seconds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool.value,
            "action": self.action,
            "current": self.current,
            "target": self.target,
            "reason": self.reason,
        }


def decide(
    pool: WorkerRole,
    current: int,
    wanted: int,
    wanted_with_margin: int,
    limits: PoolLimits,
    rules: DecisionRules,
    state: PoolState,
    now: float,
) -> Decision:
    """Decide for one pool. `wanted`: the plan for the observed load; `wanted_with_margin`: the plan for
    the load times (1 + hysteresis), >= `wanted`. Updates `state`'s streak, never its last change (the
    loop records a change once it is applied)."""

    def out(action: Action, target: int, reason: str) -> Decision:
        return Decision(pool, action, current, target, reason, now)

    if current < limits.min:
        state.down_streak = 0
        return out("up", limits.min, f"below min {limits.min}")
    if current > limits.max:
        state.down_streak = 0
        return out("down", limits.max, f"above max {limits.max}")
    since = None if state.last_change_at is None else now - state.last_change_at
    up = limits.clamp(wanted)
    if up > current:
        state.down_streak = 0
        capped = " (capped by max)" if wanted > limits.max else ""
        if since is not None and since < rules.up_cooldown_s:
            left = rules.up_cooldown_s - since
            return out("hold", current, f"plan wants {wanted}{capped}; up cooldown {left:.0f}s left")
        return out("up", up, f"plan wants {wanted}{capped}")
    down = limits.clamp(max(wanted, wanted_with_margin))
    if down >= current:
        state.down_streak = 0
        if wanted < current:
            return out(
                "hold", current, f"plan wants {wanted}, {wanted_with_margin} with the hysteresis margin"
            )
        return out("hold", current, f"plan wants {wanted}")
    state.down_floor = down if state.down_streak == 0 else max(state.down_floor, down)
    state.down_streak += 1
    if state.down_streak < rules.down_intervals:
        return out(
            "hold",
            current,
            f"plan wants {down} with margin; {state.down_streak}/{rules.down_intervals} intervals",
        )
    if since is not None and since < rules.down_cooldown_s:
        left = rules.down_cooldown_s - since
        return out("hold", current, f"plan wants {down} with margin; down cooldown {left:.0f}s left")
    target = max(state.down_floor, current - max(1, rules.max_step_down))
    state.down_streak = 0
    return out("down", target, f"plan wants {down} with margin for {rules.down_intervals} intervals")
