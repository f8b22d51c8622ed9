"""The autoscaler: decisions (min/max, cooldowns, hysteresis), the loop's stability and failure handling,
cost accounting, and scale up/down on the real app over simulated engines with streams in flight."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kvroute.engines.sim.fleet import SimFleet
from kvroute.engines.sim.profiles import get_profile
from kvroute.router.app import ADMIN, REGISTRY, ROUTER, create_app
from kvroute.router.autoscale.base import NewWorker, ScaleRequest, ScalerError
from kvroute.router.autoscale.command import CommandScaler
from kvroute.router.autoscale.cost import CostMeter, CostModel, cost_per_million_goodput
from kvroute.router.autoscale.decide import DecisionRules, PoolLimits, PoolState, decide
from kvroute.router.autoscale.loop import Autoscaler, AutoscaleSettings
from kvroute.router.autoscale.runtime import SCALER
from kvroute.router.autoscale.sim import SimScaler
from kvroute.router.pd_metrics import WindowSummary
from kvroute.router.planner import ObservedLoad, PlanTargets, plan
from kvroute.router.types import Worker, WorkerRole, WorkerState
from tests.router.conftest import sse_data, test_config, wait_until

P, D = WorkerRole.PREFILL, WorkerRole.DECODE
PROFILE = get_profile("h100-llama3-8b")


# ---- decide(): a table, one row per rule -----------------------------------------------------------
RULES = DecisionRules(up_cooldown_s=30, down_cooldown_s=60, hysteresis=0.2, down_intervals=3)
LIM = PoolLimits(1, 4)


@pytest.mark.parametrize(
    "current, wanted, margin, last_change_ago, streak, action, target",
    [
        (0, 1, 1, None, 0, "up", 1),  # below min: to min at once
        (6, 2, 2, 1.0, 0, "down", 4),  # above max: to max at once, cooldown or not
        (2, 9, 9, None, 0, "up", 4),  # the plan asks beyond max: capped
        (2, 3, 3, 10.0, 0, "hold", 2),  # up within the up cooldown (30 s): waits
        (2, 3, 3, 31.0, 0, "up", 3),  # after it: grows
        (3, 2, 3, None, 0, "hold", 3),  # fewer wanted, but not with the margin: hysteresis holds
        (3, 2, 2, None, 0, "hold", 3),  # fewer even with the margin: 1st of 3 intervals
        (3, 2, 2, None, 2, "down", 2),  # 3rd interval in a row: one worker goes
        (3, 2, 2, 59.0, 2, "hold", 3),  # ... unless the pool changed under 60 s ago
        (3, 0, 0, None, 2, "down", 2),  # at most max_step_down (1) per decision
        (1, 0, 0, None, 5, "hold", 1),  # never below min
    ],
)
def test_decide_rules(
    current: int,
    wanted: int,
    margin: int,
    last_change_ago: float | None,
    streak: int,
    action: str,
    target: int,
) -> None:
    now = 1000.0
    st = PoolState(None if last_change_ago is None else now - last_change_ago, streak, 0)
    d = decide(D, current, wanted, margin, LIM, RULES, st, now)
    assert (d.action, d.target) == (action, target), d.reason
    assert LIM.min <= d.target <= LIM.max or d.target == current


# ---- the loop with a recording scaler -----------------------------------------------------------
@dataclass
class FakeWindow:
    """Observations the test sets (the PD window's summary shape)."""

    load: ObservedLoad

    def summary(self, current_prefill: Any = None, current_decode: Any = None, horizon_s: Any = None) -> Any:
        import dataclasses

        load = dataclasses.replace(self.load, current_prefill=current_prefill, current_decode=current_decode)
        return WindowSummary(100, 30.0, 0.0, load, None, None)


@dataclass
class FakeRegistry:
    """The registry's add/drain/undrain/remove over a list of `Worker`s (the loop's unit tests only; the
    end-to-end tests below use the real one)."""

    workers: list[Worker] = field(default_factory=list)

    def add(
        self,
        url: str,
        role: WorkerRole = WorkerRole.REGULAR,
        kv_events: Any = None,
        bootstrap_port: Any = None,
    ) -> Worker:
        w = Worker(url, role=role, state=WorkerState.HEALTHY)
        self.workers.append(w)
        return w

    def _get(self, url: str) -> Worker:
        return next(w for w in self.workers if w.url == url)

    def drain(self, url: str) -> Worker:
        w = self._get(url)
        w.state = WorkerState.DRAINING
        return w

    def undrain(self, url: str) -> Worker:
        w = self._get(url)
        w.state = WorkerState.HEALTHY
        return w

    async def remove(self, url: str) -> None:
        self.workers.remove(self._get(url))


@dataclass
class RecordingScaler:
    """Counts pools itself; `fail` makes the next calls raise (as a hook exiting 1 would)."""

    name: str = "recording"
    size: dict[WorkerRole, int] = field(default_factory=lambda: {P: 1, D: 1})
    calls: list[ScaleRequest] = field(default_factory=list)
    fail: int = 0
    n: int = 0

    async def sizes(self) -> Mapping[WorkerRole, int]:
        return dict(self.size)

    async def scale(self, request: ScaleRequest) -> Sequence[NewWorker]:
        self.calls.append(request)
        if self.fail > 0:
            self.fail -= 1
            raise ScalerError("exit status 1")
        added = []
        for _ in range(request.target - (self.size[request.pool] - len(request.remove))):
            self.n += 1
            added.append(NewWorker(f"http://10.0.0.{self.n}:30000", request.pool))
        self.size[request.pool] = request.target
        return added

    async def close(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _loop(
    load: ObservedLoad, scaler: RecordingScaler, reg: FakeRegistry, clock: Clock, **kw: Any
) -> Autoscaler:
    limits = kw.pop("limits", {P: PoolLimits(1, 6), D: PoolLimits(1, 6)})
    settings = AutoscaleSettings(
        interval_s=10, limits=limits, rules=kw.pop("rules", RULES), retry_base_s=5, retry_max_s=40, **kw
    )
    return Autoscaler(settings, scaler, reg, lambda: reg.workers, FakeWindow(load), PROFILE, clock=clock)


def _fleet(reg: FakeRegistry, prefill: int, decode: int) -> None:
    for i in range(prefill):
        reg.add(f"http://p{i}:1", P)
    for i in range(decode):
        reg.add(f"http://d{i}:1", D)


MOONCAKE = dict(prompt_tokens=12000.0, output_tokens=340.0, cache_hit_ratio=0.3)


def _needs(rate: float) -> tuple[int, int]:
    p = plan(ObservedLoad(rate, **MOONCAKE), PlanTargets(), PROFILE)
    return p.prefill_workers, p.decode_workers


async def test_loop_scales_up_to_the_plan_and_holds_still_under_steady_load() -> None:
    """Steady load whose rate wobbles +-8% around a pool-size boundary: one scale-up, then no change in
    10 intervals (hysteresis and the down streak keep it from flapping)."""
    # find a rate where the prefill plan steps from n to n+1 (the worst place to flap)
    rate = 0.5
    while _needs(rate * 1.08)[0] == _needs(rate * 0.92)[0]:
        rate += 0.05
    clock, reg, scaler = Clock(), FakeRegistry(), RecordingScaler()
    _fleet(reg, 1, 1)
    window = FakeWindow(ObservedLoad(rate, **MOONCAKE))
    loop = _loop(window.load, scaler, reg, clock)
    loop.window = window
    changes = []
    for i in range(14):
        window.load = ObservedLoad(rate * (1.08 if i % 2 else 0.92), **MOONCAKE)
        for d in await loop.step():
            if d.action != "hold":
                changes.append((i, d.pool, d.action, d.current, d.target))
        clock.t += 10
    first = [c for c in changes if c[0] < 4]
    assert first, "the fleet below the plan was not scaled up"
    late = [c for c in changes if c[0] >= 4]
    assert late == [], f"flapping under steady load: {late}"
    assert all(a == "up" for _, _, a, _, _ in changes)
    p_need, d_need = _needs(rate * 1.08)
    assert scaler.size[P] == p_need and scaler.size[D] == d_need


async def test_min_and_max_are_respected_whatever_the_load() -> None:
    clock, reg, scaler = Clock(), FakeRegistry(), RecordingScaler()
    _fleet(reg, 1, 1)
    limits = {P: PoolLimits(2, 3), D: PoolLimits(1, 2)}
    rules = DecisionRules(up_cooldown_s=0, down_cooldown_s=0, hysteresis=0.0, down_intervals=1)
    loop = _loop(ObservedLoad(50.0, **MOONCAKE), scaler, reg, clock, limits=limits, rules=rules)
    for _ in range(4):
        await loop.step()
        clock.t += 10
    assert scaler.size == {P: 3, D: 2}  # the plan wants far more: capped at max
    assert all(c.target <= limits[c.pool].max for c in scaler.calls)
    loop.window = FakeWindow(ObservedLoad(0.0, **MOONCAKE))
    for _ in range(8):
        await loop.step()
        clock.t += 10
        await asyncio.sleep(0)  # let the removal tasks (no request in flight) finish
        for _ in range(20):
            if not loop.removing:
                break
            await asyncio.sleep(0.01)
    assert scaler.size == {P: 2, D: 1}  # idle: down to min, never below
    assert all(c.target >= limits[c.pool].min for c in scaler.calls)
    await loop.close()


async def test_a_failing_scaler_is_retried_with_backoff_and_reported() -> None:
    clock, reg, scaler = Clock(), FakeRegistry(), RecordingScaler(fail=2)
    _fleet(reg, 1, 1)
    rules = DecisionRules(up_cooldown_s=0, down_cooldown_s=0, hysteresis=0.2, down_intervals=1)
    loop = _loop(
        ObservedLoad(8.0, **MOONCAKE),
        scaler,
        reg,
        clock,
        rules=rules,
        limits={P: PoolLimits(1, 6), D: PoolLimits(1, 1)},
    )
    ds = await loop.step()  # prefill up: fails (1st)
    assert [c.pool for c in scaler.calls] == [P]
    assert "failed" in loop.decisions[-2]["outcome"] and loop.failures
    assert loop.status()["pools"]["prefill"]["retry_in_s"] == 5.0
    clock.t += 2
    ds = await loop.step()  # inside the 5 s backoff: holds, says why, no call
    assert len(scaler.calls) == 1 and "retrying the scaler" in ds[0].reason
    clock.t += 4
    await loop.step()  # retried: fails (2nd); backoff doubles
    assert len(scaler.calls) == 2 and loop.status()["pools"]["prefill"]["retry_in_s"] == 10.0
    clock.t += 10
    await loop.step()  # retried: succeeds
    assert len(scaler.calls) == 3 and scaler.size[P] > 1
    assert loop.status()["pools"]["prefill"]["retry_in_s"] is None
    assert len(loop.failures) == 2


async def test_command_hook_contract_exit_status_stdout_and_timeout(tmp_path: Any) -> None:
    """The hook gets the request as JSON on stdin; exit 0 with `added` registers workers; exit 1 and a
    timeout are failures (ScalerError), never exceptions of another kind."""
    seen = tmp_path / "seen.json"
    ok = tmp_path / "ok.py"
    ok.write_text(
        "import json, sys\n"
        f"req = json.load(sys.stdin); open({str(seen)!r}, 'w').write(json.dumps(req))\n"
        "print(json.dumps({'added': [{'url': 'http://10.1.1.1:30000', 'bootstrap_port': 8998}]}))\n"
    )
    s = CommandScaler(f"{sys.executable} {ok}", timeout_s=20)
    added = await s.scale(ScaleRequest(P, 1, 2, (), "plan wants 2", {"prefill_workers": 2}))
    assert added == [NewWorker("http://10.1.1.1:30000", P, 8998, None)]
    got = json.loads(seen.read_text())
    assert got == {"pool": "prefill", "current": 1, "target": 2, "remove": [], "reason": "plan wants 2",
                   "plan": {"prefill_workers": 2}}  # fmt: skip
    bad = CommandScaler(
        f"{sys.executable} -c 'import sys; sys.stderr.write(\"quota exceeded\"); sys.exit(1)'"
    )
    with pytest.raises(ScalerError, match="exited with 1: quota exceeded"):
        await bad.scale(ScaleRequest(D, 1, 2))
    slow = CommandScaler(f"{sys.executable} -c 'import time; time.sleep(30)'", timeout_s=0.3)
    with pytest.raises(ScalerError, match="killed"):
        await slow.scale(ScaleRequest(D, 1, 2))
    with pytest.raises(ScalerError, match="cannot run"):
        await CommandScaler("/nonexistent/hook").scale(ScaleRequest(D, 1, 2))


def test_cost_meter_integrates_gpu_seconds_and_counts_goodput() -> None:
    clock = Clock()
    m = CostMeter(CostModel(gpu_hour_cost=3.6, gpus_per_worker={"prefill": 1, "decode": 2}), clock)
    m.update({"prefill": 2, "decode": 1})
    clock.t = 100.0
    m.update({"prefill": 1, "decode": 1})  # 100 s at 2 prefill x 1 + 1 decode x 2 GPUs = 400 GPU-s
    clock.t = 200.0
    m.update({"prefill": 1, "decode": 1})  # + 100 s x 3 GPUs
    m.record(True, 0.5, [0.02, 0.03], 1000)  # within both targets
    m.record(True, 1.5, [0.02], 500)  # TTFT missed: served, not goodput
    m.record(True, 0.5, [0.09], 700)  # ITL missed
    m.record(False, None, None, 0)  # failed
    r = m.report()
    assert r["gpu_seconds"] == 700.0 and r["gpu_seconds_by_pool"] == {"prefill": 300.0, "decode": 400.0}
    assert (r["requests"], r["requests_within_sla"], r["goodput_tokens"], r["output_tokens"]) == (
        4,
        1,
        1000,
        2200,
    )
    # 700 GPU-s at 3.6/GPU-h = 0.7; per million goodput tokens: 0.7 / 0.001
    assert r["cost_per_million_goodput_tokens"] == pytest.approx(700.0)
    assert cost_per_million_goodput(700, 0.0, 1000) != cost_per_million_goodput(
        700, 0.0, 1000
    )  # NaN: no price


# ---- end to end: the real app, simulated engines, streams in flight ------------------------------
@pytest.fixture
async def pd_app() -> AsyncIterator[Any]:
    started: list[tuple[web.AppRunner, aiohttp.ClientSession, SimFleet]] = []

    async def make(
        prefill: int, decode: int, **cfg: Any
    ) -> tuple[str, web.Application, SimFleet, aiohttp.ClientSession]:
        fleet = SimFleet(0, prefill=prefill, decode=decode, time_scale=0.05, bootstrap_timeout_s=20.0,
                         profile="h100-llama3-8b")  # fmt: skip
        await fleet.start()
        config = test_config(
            pd_disaggregation=True,
            prefill_urls=tuple((u, None) for u in fleet.prefill_urls),
            decode_urls=tuple(fleet.decode_urls),
            **{
                "autoscale": True,
                "autoscale_interval_s": 3600.0,  # the test drives step() itself unless it says otherwise
                "request_timeout_s": 60.0,
                "stream_idle_timeout_s": 30.0,
                **cfg,
            },
        )
        app = create_app(config)
        if config.autoscale_scaler == "sim":
            app[SCALER] = SimScaler(fleet)  # over the test's fleet (else the app would build its own)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        session = aiohttp.ClientSession()
        started.append((runner, session, fleet))
        host, port = runner.addresses[0][:2]
        await wait_until(lambda: len(app[REGISTRY].healthy_urls()) >= prefill + decode, 10, "fleet healthy")
        return f"http://{host}:{port}", app, fleet, session

    yield make
    for runner, session, fleet in started:
        await session.close()
        await runner.cleanup()
        await fleet.close()


async def _stream(session: aiohttp.ClientSession, url: str, i: int, tokens: int) -> tuple[int, int, bool]:
    body = {
        "text": f"request {i} " + "x" * 200,
        "sampling_params": {"max_new_tokens": tokens},
        "stream": True,
    }
    async with session.post(url + "/generate", json=body) as r:
        raw = await r.read()
    data = sse_data(raw)
    last = json.loads(data[-2]) if len(data) >= 2 else {}
    return r.status, int(last.get("meta_info", {}).get("completion_tokens", 0)), data[-1:] == [b"[DONE]"]


async def test_scale_down_and_up_with_streams_in_flight_loses_no_request(pd_app: Any) -> None:
    url, app, fleet, session = await pd_app(
        1, 3, autoscale_min_decode=1, autoscale_down_intervals=1, autoscale_down_cooldown_s=0,
        autoscale_up_cooldown_s=0, autoscale_hysteresis=0.0,
    )  # fmt: skip
    auto = app[ADMIN].autoscale.autoscaler
    scaler: SimScaler = app[SCALER]  # type: ignore[assignment]
    in_flight_at_stop: dict[str, int] = {}
    real_scale = scaler.scale

    async def watched(req: ScaleRequest) -> Sequence[NewWorker]:
        for u in req.remove:  # what the router counted on the worker when the scaler was told to stop it
            in_flight_at_stop[u] = next(w.load.in_flight for w in app[ROUTER].workers() if w.url == u)
        return await real_scale(req)

    scaler.scale = watched  # type: ignore[method-assign]
    streams = [asyncio.create_task(_stream(session, url, i, 400)) for i in range(9)]
    decode_urls = set(fleet.decode_urls)
    await wait_until(
        lambda: all(w.load.in_flight > 0 for w in app[ROUTER].workers() if w.url in decode_urls), 15,
        "streams on every decode worker",
    )  # fmt: skip
    auto.window = FakeWindow(ObservedLoad(0.01, 300.0, 50.0))  # demand gone: one decode worker is enough
    ds = {d.pool: d for d in await auto.step()}
    assert ds[D].action == "down" and ds[D].target == 2
    draining = list(auto.removing)
    assert len(draining) == 1
    assert app[REGISTRY].describe(draining[0])["state"] == "draining"
    # demand back while it drains: the draining worker is taken back before anything new starts
    auto.window = FakeWindow(ObservedLoad(200.0, 300.0, 400.0))  # plan: 4 decode
    before = len(fleet.decode_urls)
    ds = {d.pool: d for d in await auto.step()}
    assert ds[D].action == "up"
    if not in_flight_at_stop:  # it was still draining: taken back, serving again
        assert app[REGISTRY].describe(draining[0])["state"] == "healthy"
    assert len(fleet.decode_urls) >= before
    new = [u for u in fleet.decode_urls if u not in decode_urls]
    await wait_until(lambda: all(u in app[REGISTRY].healthy_urls() for u in new), 10, "new workers healthy")
    # and down again, to the minimum, while the streams still run
    auto.window = FakeWindow(ObservedLoad(0.01, 300.0, 50.0))
    for _ in range(8):
        await auto.step()
    results = await asyncio.gather(*streams)
    await wait_until(lambda: not auto.removing, 20, "drained workers removed")
    assert [r[0] for r in results] == [200] * 9
    assert all(done and n == 400 for _, n, done in results), results  # every stream complete
    assert in_flight_at_stop and all(v == 0 for v in in_flight_at_stop.values()), in_flight_at_stop
    assert len(fleet.decode_urls) == 1 and len(app[REGISTRY].urls()) == 2
    assert set(app[REGISTRY].urls()) == set(fleet.urls)  # registry and engines agree
    # every decision is visible in GET /admin/plan with its inputs and reason
    async with session.get(url + "/admin/plan") as r:
        body = await r.json()
    acts = [d for d in body["autoscale"]["decisions"] if d["action"] != "hold"]
    assert acts and all(d["reason"] and d["inputs"]["request_rate"] is not None for d in acts)
    assert body["cost"]["gpu_seconds"] > 0
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    assert 'kvroute_autoscale_decisions_total{action="down",pool="decode"}' in text


async def test_autoscale_grows_an_empty_pool_to_its_minimum(pd_app: Any) -> None:
    url, app, fleet, session = await pd_app(1, 1, autoscale_min_decode=2, autoscale_min_prefill=1)
    auto = app[ADMIN].autoscale.autoscaler
    await wait_until(lambda: auto.steps >= 1 and not auto._lock.locked(), 10, "first step")
    await wait_until(lambda: len(fleet.decode_urls) == 2, 10, "decode pool at its minimum")
    await wait_until(lambda: len(app[REGISTRY].healthy_urls()) == 3, 10, "new worker registered")
    status, n, done = await _stream(session, url, 0, 20)
    assert (status, n, done) == (200, 20, True)


async def test_a_failing_hook_is_reported_and_the_router_keeps_serving(pd_app: Any, tmp_path: Any) -> None:
    """The command scaler's hook exits 1 on every call: the router serves on, and the failure is in
    /admin/plan and /metrics, retried with growing waits."""
    hook = tmp_path / "hook.py"
    calls = tmp_path / "calls"
    hook.write_text(
        f"import sys\nopen({str(calls)!r}, 'a').write('x')\nsys.stderr.write('no capacity')\nsys.exit(1)\n"
    )
    url, app, fleet, session = await pd_app(
        1, 1, autoscale_scaler="command", autoscale_command=f"{sys.executable} {hook}",
        autoscale_min_decode=2, autoscale_interval_s=0.2,
    )  # fmt: skip
    auto = app[ADMIN].autoscale.autoscaler
    await wait_until(lambda: len(auto.failures) >= 2, 20, "two failed hook runs")
    assert all("exited with 1: no capacity" in f["error"] for f in auto.failures)
    # backoff: 1 s then 2 s between tries, not one try per 0.2 s interval
    assert auto.failures[1]["at"] - auto.failures[0]["at"] >= 0.9
    assert (await _stream(session, url, 0, 10))[:2] == (200, 10)  # still serving
    async with session.get(url + "/admin/plan") as r:
        body = await r.json()
    assert body["autoscale"]["failures"] and body["autoscale"]["pools"]["decode"]["retry_in_s"] is not None
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    assert 'kvroute_autoscale_scaler_failures_total{pool="decode",scaler="command"}' in text
    assert len(fleet.decode_urls) == 1  # nothing started behind the router's back


def test_a_short_window_counts_as_a_surge_only_beyond_what_bursts_explain() -> None:
    from kvroute.router.autoscale.loop import surge_rate

    # 1.5 req/s in bursts of 10: a 10 s window holding two bursts (2.0/s) is noise, a tripled rate is not
    assert not surge_rate(1.5, 2.0, 10.0, 10.0, 2.0)
    assert surge_rate(1.5, 4.5, 10.0, 10.0, 2.0)
    # Poisson arrivals: the same excess is significant
    assert surge_rate(1.5, 3.0, 10.0, 1.0, 2.0)
    assert not surge_rate(1.5, 1.4, 10.0, 1.0, 0.0)


async def test_no_shrink_on_too_few_prompt_samples() -> None:
    """A light first minute of traffic plans a small pool; its tail is not known yet: growth is allowed on
    a thin sample, shrinking waits for `shrink_min_samples`."""
    rules = DecisionRules(up_cooldown_s=0, down_cooldown_s=0, hysteresis=0.2, down_intervals=1)
    for samples, shrinks in ((50, False), (300, True)):
        clock, reg, scaler = Clock(), FakeRegistry(), RecordingScaler()
        _fleet(reg, 4, 1)
        scaler.size = {P: 4, D: 1}
        load = ObservedLoad(0.2, 2000.0, 100.0, prompt_samples=((2000, 0),) * samples)
        loop = _loop(load, scaler, reg, clock, rules=rules, shrink_min_samples=200)
        decisions = await loop.step()
        prefill = next(d for d in decisions if d.pool is P)
        assert (prefill.action == "down") is shrinks
        if not shrinks:
            assert "prompt samples" in prefill.reason
