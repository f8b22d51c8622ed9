"""The autoscaler loop: every interval, observe the load, ask the planner, decide per pool, act.

Observe: the PD window (`kvroute.router.pd_metrics.PDWindow`) over the last `window_s` seconds: arrival rate,
mean prompt and output lengths, cache-hit ratio, measured TTFT and ITL, and the routable workers per pool.
The rate planned for is the window's, or the last `up_window_s` seconds' when that is higher by more than
the arrivals' bursts explain (fast up on a surge, slow down: the shrink must also hold with the
hysteresis margin for several decisions).
Plan: `kvroute.router.planner.plan` (pure) for that load, and again for the load plus the hysteresis margin.
Decide: `kvroute.router.autoscale.decide` (min/max, cooldowns, hysteresis).
Act, through the `Scaler` and the registry:
- up: workers drained for removal but not yet stopped are taken back first (undrained: free capacity);
  then the scaler starts the rest and the router registers what it reports;
- down: the workers with the fewest requests in flight are drained at once (no new request reaches
  them), and a task per worker waits until it has none in flight, then asks the scaler to stop it and
  removes it from the registry. A worker with requests in flight is never removed.
A failed scaler call is logged, counted and retried with exponential backoff; it never ends the loop.
With a lease (`kvroute.router.autoscale.lease`, replicas sharing Redis) only the replica holding it acts,
and it
plans for every replica's window (`kvroute.router.autoscale.share`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvroute.engines.sim.profiles import GpuProfile
from kvroute.router.autoscale.base import POOLS, NewWorker, Scaler, ScaleRequest
from kvroute.router.autoscale.cost import CostMeter
from kvroute.router.autoscale.decide import Decision, DecisionRules, PoolLimits, PoolState, decide
from kvroute.router.planner import ObservedLoad, Plan, PlanTargets, plan
from kvroute.router.shared.common import Backoff, cancel_and_wait
from kvroute.router.types import Worker, WorkerRole, WorkerState

log = logging.getLogger("kvroute.autoscale")


@dataclass(frozen=True)
class AutoscaleSettings:
    """The loop's knobs. Seconds unless named otherwise."""

    interval_s: float = 10.0  # between decisions
    window_s: float = 30.0  # traffic each decision reads (the newest part of the PD window)
    up_window_s: float = 10.0  # a shorter look at the arrival rate: growth follows it when it is higher
    growth_sigmas: float = 1.0  # ... by more than this many standard deviations of its count, given the
    # window's rate and burstiness (bursts of X at once: Var[N] ~= E[N] x E[X^2]/E[X]); 0 = any higher
    shrink_min_samples: int = 200  # prompt samples a shrink needs: with heavy-tailed prompts (a few in a
    # hundred beyond 100k tokens), fewer may hold none of the tail and plan a pool too small for it
    limits: Mapping[WorkerRole, PoolLimits] = field(
        default_factory=lambda: {WorkerRole.PREFILL: PoolLimits(), WorkerRole.DECODE: PoolLimits()}
    )
    rules: DecisionRules = field(default_factory=DecisionRules)
    targets: PlanTargets = field(default_factory=PlanTargets)
    retry_base_s: float = 1.0  # first wait after a failed scaler call (doubles up to retry_max_s)
    retry_max_s: float = 60.0
    drain_poll_s: float = 0.1  # how often a draining worker's in-flight count is read
    drain_settle_s: float = 0.0  # replicas: the count must stay 0 this long (other replicas' loads lag)
    time_scale: float = 1.0  # wall seconds per engine second (simulated engines run slower or faster):
    # measurements are converted to engine time before planning; 1 for real engines


class Observations(Protocol):
    """What the loop reads the load from: `kvroute.router.pd_metrics.PDWindow`."""

    def summary(
        self,
        current_prefill: int | None = None,
        current_decode: int | None = None,
        horizon_s: float | None = None,
    ) -> Any: ...


class Registry(Protocol):
    """The registry operations the loop acts through (`kvroute.router.workers.WorkerRegistry`)."""

    def add(
        self,
        url: str,
        role: WorkerRole = ...,
        kv_events: str | None = None,
        bootstrap_port: int | None = None,
    ) -> Worker: ...

    def drain(self, url: str) -> Worker: ...

    def undrain(self, url: str) -> Worker: ...

    async def remove(self, url: str) -> None: ...


class Leadership(Protocol):
    """Who acts in a replica set (`kvroute.router.autoscale.lease.RedisLease`)."""

    async def acquire(self) -> bool: ...

    async def release(self) -> None: ...


@dataclass
class _Removal:
    pool: WorkerRole
    since: float
    waiting: bool = True  # still waiting for the worker to go idle (can be taken back)
    task: asyncio.Task[None] | None = None


class Autoscaler:
    """One router's autoscaler. `step()` is one interval (tests drive it directly); `start()` runs it
    every `interval_s` until `close()`.

    Invariants: a worker is removed from the registry only after the scaler stopped it and while it had
    no request in flight; the scaler is called by one coroutine at a time; with `leadership`, nothing is
    changed by a replica that does not hold the lease."""

    def __init__(
        self,
        settings: AutoscaleSettings,
        scaler: Scaler,
        registry: Registry,
        workers: Callable[[], list[Worker]],
        window: Observations,
        profile: GpuProfile,
        *,
        meter: CostMeter | None = None,
        metrics: Any = None,
        leadership: Leadership | None = None,
        share: Any = None,
        replicas: Callable[[], Any] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.scaler = scaler
        self.registry = registry
        self.workers = workers
        self.window = window
        self.profile = profile
        self.meter = meter
        self.metrics = metrics
        self.leadership = leadership
        self.share = share  # router.autoscale.share.ObservationShare with replicas, else None
        self.replicas = replicas
        self.clock = clock
        self.leader = leadership is None
        self.pools: dict[WorkerRole, PoolState] = {p: PoolState() for p in POOLS}
        self.removing: dict[str, _Removal] = {}
        self.decisions: deque[dict[str, Any]] = deque(maxlen=50)
        self.failures: deque[dict[str, Any]] = deque(maxlen=20)
        self.last: dict[str, Any] = {}
        self.steps = 0
        self._retry_at: dict[WorkerRole, float] = {}
        self._backoff = {p: Backoff(settings.retry_base_s, settings.retry_max_s) for p in POOLS}
        self._lock = asyncio.Lock()  # one scaler call at a time (sizes read inside stay true)
        self._task: asyncio.Task[None] | None = None
        self._lengths: tuple[float, float] | None = None  # last known mean prompt/output lengths

    # ---- lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kvroute-autoscale")

    async def close(self) -> None:
        if self._task is not None:
            # repeated until it lands: redis-py can swallow a cancel while it connects (lease, share)
            await cancel_and_wait((self._task,))
            self._task = None
        await self._abandon_removals()
        if self.leadership is not None:
            self.leader = False
            with contextlib.suppress(Exception):
                await self.leadership.release()

    async def _run(self) -> None:
        first = True
        while True:
            try:
                # at start only the bounds apply: a window of traffic must be seen before a plan counts
                await self.step(bounds_only=first)
                first = False
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one interval must not end autoscaling for the process
                log.exception("autoscale: interval failed")
            await asyncio.sleep(self.settings.interval_s)

    # ---- one interval

    async def step(self, bounds_only: bool = False) -> list[Decision]:
        """Observe, plan, decide and act once. Returns the decisions (empty when not the leader).
        `bounds_only`: apply min and max, not the plan (the first interval, with no traffic seen yet)."""
        self.steps += 1
        own, finished = self._own_window()
        if self.share is not None:  # every replica publishes its window; the leader plans for the sum
            try:
                await self.share.publish(own, finished)
            except Exception as exc:  # noqa: BLE001 - Redis away: the leader plans from what it has
                log.debug("autoscale: cannot publish this replica's window: %s", exc)
        if not await self._lead():
            return []
        now = self.clock()
        try:
            platform = await self.scaler.sizes()
        except Exception as exc:  # noqa: BLE001 - any scaler failure is reported, never raised
            self._failed(None, f"reading pool sizes: {exc}", now)
            return []
        workers = self.workers()
        current = {p: self._current(p, platform, workers) for p in POOLS}
        routable = {p: sum(1 for w in workers if w.role is p and w.routable) for p in POOLS}
        self._update_meter(platform, workers)
        load = None if bounds_only else await self._observe(own, finished, routable)
        targets = self.settings.targets
        h = self.settings.rules.hysteresis
        now_plan = margin_plan = None
        if load is not None:
            now_plan = plan(load, targets, self.profile)
            margin_load = dataclasses.replace(load, request_rate=load.request_rate * (1.0 + h))
            margin_plan = plan(margin_load, targets, self.profile) if h > 0 else now_plan
        out: list[Decision] = []
        for pool in POOLS:
            if now_plan is None or margin_plan is None:  # requests arrive, lengths unknown: bounds only
                wanted = with_margin = current[pool]
            else:
                wanted, with_margin = _count(now_plan, pool), _count(margin_plan, pool)
            thin = load is not None and 0 < len(load.prompt_samples) < self.settings.shrink_min_samples
            if thin:  # grow on a thin sample, never shrink on one
                with_margin = max(with_margin, current[pool])
            d = decide(
                pool,
                current[pool],
                wanted,
                with_margin,
                self.settings.limits[pool],
                self.settings.rules,
                self.pools[pool],
                now,
            )
            if thin and d.action == "hold" and wanted < d.current and load is not None:
                d = dataclasses.replace(
                    d,
                    reason=f"{d.reason}; only {len(load.prompt_samples)} prompt samples "
                    f"(< {self.settings.shrink_min_samples}): no shrink on a thin tail estimate",
                )
            retry_at = self._retry_at.get(pool)
            if d.action != "hold" and retry_at is not None and now < retry_at:
                d = dataclasses.replace(
                    d,
                    action="hold",
                    target=d.current,
                    reason=f"{d.reason}; retrying the scaler in {retry_at - now:.1f}s",
                )
            outcome = await self._apply(d, now_plan) if d.action != "hold" else "held"
            self._record(d, load, wanted, routable[pool], outcome, now_plan)
            out.append(d)
        self.last = {
            "at": now,
            "observed": dataclasses.asdict(load) if load is not None else None,
            "plan": now_plan.as_dict() if now_plan is not None else None,
            "plan_with_margin": (
                {"prefill_workers": margin_plan.prefill_workers, "decode_workers": margin_plan.decode_workers}
                if margin_plan is not None
                else None
            ),
        }
        self._update_meter(await self._sizes_quiet(), self.workers())
        return out

    async def _sizes_quiet(self) -> Mapping[WorkerRole, int] | None:
        try:
            return await self.scaler.sizes()
        except Exception:  # noqa: BLE001 - the meter falls back to the registry's counts
            return None

    async def _lead(self) -> bool:
        if self.leadership is None:
            return True
        try:
            held = await self.leadership.acquire()
        except Exception as exc:  # noqa: BLE001 - an unreachable Redis means: do not act
            log.warning("autoscale: lease check failed (%s): not acting", exc)
            held = False
        if held != self.leader:
            log.info("autoscale: this replica %s the scaler", "is now" if held else "is no longer")
            if not held:
                await self._abandon_removals()
        self.leader = held
        if self.metrics is not None:
            self.metrics.leader.set(1 if held else 0)
        return held

    def _current(
        self, pool: WorkerRole, platform: Mapping[WorkerRole, int] | None, workers: list[Worker]
    ) -> int:
        """The pool's size for decisions: the platform's count (or the registry's) less the workers on
        their way out."""
        leaving = sum(1 for r in self.removing.values() if r.pool is pool)
        if platform is not None and pool in platform:
            return max(0, platform[pool] - leaving)
        return sum(
            1
            for w in workers
            if w.role is pool and w.url not in self.removing and w.state is not WorkerState.REJECTED
        )

    def _own_window(self) -> tuple[ObservedLoad, int]:
        """This replica's window: its load (the rate the short window's when `surge_rate` says so) and
        the number of finished requests behind the means."""
        st = self.settings
        s = self.window.summary(None, None, st.window_s)
        load: ObservedLoad = s.load
        if 0 < st.up_window_s < st.window_s:
            short = self.window.summary(None, None, st.up_window_s).load.request_rate
            bursts = load.arrival_burstiness
            if surge_rate(load.request_rate, short, st.up_window_s, bursts, st.growth_sigmas):
                load = dataclasses.replace(load, request_rate=short)
        return load, int(s.requests)

    async def _observe(
        self, own: ObservedLoad, finished: int, routable: Mapping[WorkerRole, int]
    ) -> ObservedLoad | None:
        load = dataclasses.replace(
            own, current_prefill=routable[WorkerRole.PREFILL], current_decode=routable[WorkerRole.DECODE]
        )
        if self.share is not None:
            try:
                load = await self.share.fleet_load(load, finished)
                finished = max(finished, 1) if load.prompt_tokens else finished
            except Exception as exc:  # noqa: BLE001 - Redis away: plan from this replica's window
                log.warning("autoscale: cannot read the other replicas' windows (%s): planning on ours", exc)
        ts = self.settings.time_scale
        if ts != 1.0:  # the planner's profile is in engine seconds
            load = dataclasses.replace(
                load,
                request_rate=load.request_rate * ts,
                measured_ttft_s=None if load.measured_ttft_s is None else load.measured_ttft_s / ts,
                measured_itl_s=None if load.measured_itl_s is None else load.measured_itl_s / ts,
                measured_prefill_s=None if load.measured_prefill_s is None else load.measured_prefill_s / ts,
            )
        if finished:
            self._lengths = (load.prompt_tokens, load.output_tokens)
            return load
        if self._lengths is None:
            return None if load.request_rate > 0 else load  # idle: plan for no load (pools go to min)
        # requests arrive but none finished in the window (a surge on a saturated fleet): last lengths
        return dataclasses.replace(load, prompt_tokens=self._lengths[0], output_tokens=self._lengths[1])

    # ---- acting

    async def _apply(self, d: Decision, p: Plan | None) -> str:
        if d.action == "up":
            return await self._scale_up(d, p.as_dict() if p is not None else {})
        return self._scale_down(d)

    async def _scale_up(self, d: Decision, plan_dict: Mapping[str, Any]) -> str:
        need = d.target - d.current
        taken = 0
        for url, r in list(self.removing.items()):
            if taken >= need:
                break
            if r.pool is d.pool and r.waiting and r.task is not None:
                r.task.cancel()
                await asyncio.gather(r.task, return_exceptions=True)
                self.removing.pop(url, None)
                self._undrain(url)
                taken += 1
        need -= taken
        added: list[NewWorker] = []
        if need > 0:
            async with self._lock:
                try:
                    sizes = await self.scaler.sizes()
                    base = sizes[d.pool] if sizes is not None and d.pool in sizes else d.current + taken
                    req = ScaleRequest(d.pool, base, base + need, (), d.reason, plan_dict)
                    added = list(await self.scaler.scale(req))
                except Exception as exc:  # noqa: BLE001 - reported and retried, never raised
                    self._failed(d.pool, str(exc), d.at)
                    return f"failed: {exc}" + (f" (took back {taken} draining)" if taken else "")
            for nw in added:
                self._register(nw)
        self._succeeded(d.pool, d.at)
        return f"ok: took back {taken} draining, started {len(added)}"

    def _scale_down(self, d: Decision) -> str:
        candidates = [
            w
            for w in self.workers()
            if w.role is d.pool and w.url not in self.removing and w.state is not WorkerState.REJECTED
        ]
        # not-yet-healthy ones first (paid for, serving nothing), then the least loaded
        candidates.sort(key=lambda w: (w.state is WorkerState.HEALTHY, w.load.in_flight, w.url))
        chosen = candidates[: d.current - d.target]
        for w in chosen:
            try:
                self.registry.drain(w.url)
            except Exception as exc:  # noqa: BLE001 - removed meanwhile: nothing to drain
                log.info("autoscale: cannot drain %s (%s)", w.url, exc)
                continue
            rep = self.replicas()
            if rep is not None:
                rep.notify_drain(w.url, True, w.role.value)
            r = _Removal(d.pool, d.at)
            self.removing[w.url] = r
            r.task = asyncio.create_task(self._remove(w.url, r), name=f"kvroute-autoscale-remove {w.url}")
        self.pools[d.pool].last_change_at = d.at
        return f"ok: draining {', '.join(w.url for w in chosen) or 'none'}"

    async def _remove(self, url: str, r: _Removal) -> None:
        """Wait until `url` has no request in flight, then stop it (retrying with backoff) and forget it."""
        s = self.settings
        try:
            while True:
                while self._in_flight(url) > 0:
                    await asyncio.sleep(s.drain_poll_s)
                if s.drain_settle_s <= 0:
                    break
                await asyncio.sleep(s.drain_settle_s)  # replicas: other replicas' loads arrive late
                if self._in_flight(url) == 0:
                    break
            backoff = Backoff(s.retry_base_s, s.retry_max_s)
            while True:
                async with self._lock:
                    r.waiting = False
                    try:
                        sizes = await self.scaler.sizes()
                        cur = (
                            sizes[r.pool]
                            if sizes is not None and r.pool in sizes
                            else self._registered(r.pool)
                        )
                        req = ScaleRequest(r.pool, cur, max(0, cur - 1), (url,), "drained for scale-down")
                        await self.scaler.scale(req)
                        break
                    except Exception as exc:  # noqa: BLE001 - reported and retried, never raised
                        self._failed(r.pool, f"stopping {url}: {exc}", self.clock())
                await asyncio.sleep(backoff.next())
            with contextlib.suppress(Exception):
                await self.registry.remove(url)
            rep = self.replicas()
            if rep is not None:
                rep.notify_remove(url)
            log.info("autoscale: %s worker %s drained and removed", r.pool.value, url)
        finally:
            if self.removing.get(url) is r:
                del self.removing[url]

    async def _abandon_removals(self) -> None:
        """Lost the lease or closing: workers still waiting to drain serve again; stops in progress finish."""
        for url, r in list(self.removing.items()):
            if r.waiting and r.task is not None:
                r.task.cancel()
                await asyncio.gather(r.task, return_exceptions=True)
                self.removing.pop(url, None)
                self._undrain(url)
        pending = [r.task for r in self.removing.values() if r.task is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def _in_flight(self, url: str) -> int:
        for w in self.workers():
            if w.url == url:
                return w.load.in_flight
        return 0  # already gone from the registry

    def _registered(self, pool: WorkerRole) -> int:
        return sum(1 for w in self.workers() if w.role is pool)

    def _register(self, nw: NewWorker) -> None:
        try:
            self.registry.add(nw.url, nw.role, kv_events=nw.kv_events, bootstrap_port=nw.bootstrap_port)
        except Exception as exc:  # noqa: BLE001 - e.g. discovery registered it first
            log.info("autoscale: %s not registered (%s)", nw.url, exc)
            return
        rep = self.replicas()
        if rep is not None:
            rep.notify_add(nw.url, nw.role.value, nw.kv_events, nw.bootstrap_port)

    def _undrain(self, url: str) -> None:
        with contextlib.suppress(Exception):
            w = self.registry.undrain(url)
            rep = self.replicas()
            if rep is not None:
                rep.notify_drain(url, False, w.role.value)

    # ---- bookkeeping

    def _succeeded(self, pool: WorkerRole, at: float) -> None:
        self.pools[pool].last_change_at = at
        self._retry_at.pop(pool, None)
        self._backoff[pool].reset()

    def _failed(self, pool: WorkerRole | None, message: str, at: float) -> None:
        delay = 0.0
        if pool is not None:
            delay = self._backoff[pool].next()
            self._retry_at[pool] = at + delay
        self.failures.append({"at": at, "pool": pool.value if pool else None, "error": message})
        if self.metrics is not None:
            self.metrics.scaler_failures.labels(pool.value if pool else "all", self.scaler.name).inc()
        log.warning(
            "autoscale: scaler %s failed for %s: %s; retry in %.1fs",
            self.scaler.name,
            pool.value if pool else "all pools",
            message,
            delay,
        )

    def _record(
        self,
        d: Decision,
        load: ObservedLoad | None,
        planned: int,
        routable: int,
        outcome: str,
        p: Plan | None = None,
    ) -> None:
        figures = {} if p is None else {k: round(p.figures[k], 4) for k in _LOGGED if k in p.figures}
        entry = {
            **d.as_dict(),
            "at": d.at,
            "outcome": outcome,
            "routable": routable,
            "inputs": None
            if load is None
            else {
                "request_rate": round(load.request_rate, 4),
                "prompt_tokens": round(load.prompt_tokens, 1),
                "output_tokens": round(load.output_tokens, 1),
                "cache_hit_ratio": round(load.cache_hit_ratio, 4),
                "measured_ttft_s": load.measured_ttft_s,
                "measured_itl_s": load.measured_itl_s,
                "measured_prefill_s": load.measured_prefill_s,
            },
            "planned": planned,
            "figures": figures,
        }
        self.decisions.append(entry)
        if self.metrics is not None:
            self.metrics.observe_decision(d)
        logf = log.info if d.action != "hold" else log.debug
        inputs = (
            "no lengths measured yet"
            if load is None
            else f"rate {load.request_rate:.2f}/s prompt {load.prompt_tokens:.0f} output "
            f"{load.output_tokens:.0f} hit {load.cache_hit_ratio:.2f} ttft {_fmt(load.measured_ttft_s)} "
            f"itl {_fmt(load.measured_itl_s)}"
        )
        logf(
            "autoscale %s: %s %d -> %d (%s) [%s] %s %s",
            d.pool.value,
            d.action,
            d.current,
            d.target,
            d.reason,
            inputs,
            outcome,
            " ".join(f"{k}={v:g}" for k, v in figures.items()),
        )

    def _update_meter(self, platform: Mapping[WorkerRole, int] | None, workers: list[Worker]) -> None:
        if self.meter is None:
            return
        self.meter.update(paid_workers(platform, workers))

    def status(self) -> dict[str, Any]:
        """For `GET /admin/plan`: settings, pools, the last observation and plan, recent decisions."""
        now = self.clock()
        workers = self.workers()
        pools = {}
        for p in POOLS:
            lim = self.settings.limits[p]
            changed = self.pools[p].last_change_at
            pools[p.value] = {
                "min": lim.min,
                "max": lim.max,
                "registered": sum(1 for w in workers if w.role is p),
                "routable": sum(1 for w in workers if w.role is p and w.routable),
                "draining_for_removal": sorted(u for u, r in self.removing.items() if r.pool is p),
                "last_change_s_ago": None if changed is None else round(now - changed, 3),
                "retry_in_s": (round(max(0.0, self._retry_at[p] - now), 3) if p in self._retry_at else None),
            }
        s = self.settings
        return {
            "enabled": True,
            "leader": self.leader,
            "scaler": self.scaler.name,
            "interval_s": s.interval_s,
            "window_s": s.window_s,
            "up_window_s": s.up_window_s,
            "rules": dataclasses.asdict(s.rules),
            "pools": pools,
            "last": {**self.last, "at": None} if self.last else None,
            "decisions": [{**d, "s_ago": round(now - d["at"], 3)} for d in self.decisions],
            "failures": [{**f, "s_ago": round(now - f["at"], 3)} for f in self.failures],
        }


def surge_rate(long_rate: float, short_rate: float, short_s: float, burstiness: float, sigmas: float) -> bool:
    """Whether the short window's rate is a surge, not the long window's rate seen through bursts: its
    count exceeds the long rate's expectation `m` by more than `sigmas` x sqrt(burstiness x m). With
    requests arriving ~10 at a time, a 10 s window holding two bursts reads 2x the rate."""
    expected = long_rate * short_s
    return short_rate * short_s > expected + sigmas * math.sqrt(max(1.0, burstiness) * expected)


def paid_workers(platform: Mapping[WorkerRole, int] | None, workers: list[Worker]) -> dict[str, int]:
    """Workers per pool being paid for: the platform's count where it says, else every registered worker
    (pending and draining ones hold their GPUs too) except those refused at registration."""
    counts: dict[str, int] = {}
    for w in workers:
        if w.state is not WorkerState.REJECTED:
            counts[w.role.value] = counts.get(w.role.value, 0) + 1
    if platform is not None:
        for pool, n in platform.items():
            counts[pool.value] = n
    return counts


# plan figures kept with each decision (log, GET /admin/plan): what the prefill count was made of
_LOGGED = (
    "modelled_ttft_attainment",
    "ttft_infeasible_share",
    "prefill_service_s",
    "prefill_service_spread",
    "arrival_burstiness",
    "prefill_correction",
    "prefill_utilization",
    "decode_correction",
)


def _count(p: Plan, pool: WorkerRole) -> int:
    return p.prefill_workers if pool is WorkerRole.PREFILL else p.decode_workers


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}ms"
