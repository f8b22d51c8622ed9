"""The worker registry: registration in the background, health checks, circuit breakers, load polls.

The `Router` (library core) owns the `Worker` objects and decides; this module keeps them true:
it moves `Worker.state` between PENDING / HEALTHY / UNHEALTHY / DRAINING / REJECTED, subscribes the
index to each worker's KV events, corrects loads from `/get_load`, and reports workers that serve
traffic while their events never arrive ("blind"). One asyncio task per worker; all are cancelled
on removal and on close. The pure parts live beside it: `kvroute.router.breaker` (circuit breaker) and
`kvroute.router.discovery.server_info` (`/server_info` -> worker fields, KV-event endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from kvroute.engines.errors import UpstreamError, UpstreamHTTPError
from kvroute.engines.http1 import Http1Pool
from kvroute.engines.sglang import SGLangClient
from kvroute.router.breaker import Admission, CircuitBreaker, EjectionCap
from kvroute.router.config import RouterConfig, normalize_url
from kvroute.router.discovery import apply_server_info, discover_kv_events, page_size_problem
from kvroute.router.metrics import Metrics
from kvroute.router.types import EventSource, Worker, WorkerRole, WorkerState

log = logging.getLogger("kvroute.workers")

# Re-exported: these lived here before `router/breaker.py` and `router/discovery/server_info.py`.
__all__ = ["CircuitBreaker", "RegistryError", "WorkerRegistry", "blind_workers", "discover_kv_events"]

INSTANCE_HEADER = "X-Kvroute-Instance"  # on the router's /health: its instance id (self-URL detection)


class _Refused(Exception):
    """The engine refuses the router (wrong or missing API key): registration cannot succeed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RegistryError(ValueError):
    """An admin operation on the registry cannot be done (unknown or duplicate worker, bad URL)."""


@dataclass
class _Entry:
    """What the registry knows of a worker beyond the shared `Worker` record."""

    worker: Worker
    client: SGLangClient
    breaker: CircuitBreaker
    kv_override: str | None = None
    bootstrap_override: int | None = None  # PD: the operator's `--prefill URL PORT`
    task: asyncio.Task[None] | None = None
    registered_at: float | None = None
    health_failures: int = 0
    health_successes: int = 0  # consecutive good checks (restores an unhealthy worker at the threshold)
    last_health_error: str | None = None
    subscribed: bool = False
    subscribe_error: str | None = None
    models: list[str] = field(default_factory=list)
    server_info: dict[str, Any] = field(default_factory=dict)
    reported_blind: bool = False
    reopen_handle: asyncio.TimerHandle | None = None
    retire_task: asyncio.Task[None] | None = None  # `retire`: removes the worker once it is idle
    stalled: bool = False  # taken out by stall detection; back only once /health_generate passes
    stalled_probe_at: float = 0.0
    added_at: float = field(default_factory=time.monotonic)
    stall_probe: asyncio.Task[None] | None = None


class WorkerRegistry:
    """Registry of the fleet. Invariants: one entry per normalised URL, matching one `Router` worker;
    a worker is HEALTHY only after its registration checks passed (health, page size)."""

    def __init__(self, router: Any, config: RouterConfig, metrics: Metrics) -> None:
        self.router = router
        self.config = config
        self.metrics = metrics
        self._entries: dict[str, _Entry] = {}
        self._session: aiohttp.ClientSession | None = None
        self._pool = Http1Pool()
        self._blind_task: asyncio.Task[None] | None = None
        self._stall_task: asyncio.Task[None] | None = None
        self.ready_event = asyncio.Event()
        self.instance_id = ""  # this router's id (app sets it); a worker answering /health with it is us
        self.ejection_cap = EjectionCap(config.circuit_max_ejection_percent, config.circuit_min_in_rotation)

    # ---- lifecycle

    async def start(self, session: aiohttp.ClientSession, pool: Http1Pool | None = None) -> None:
        """`session`: control calls (health, info, loads); `pool`: the proxy's request connections."""
        self._session = session
        if pool is not None:
            self._pool = pool
        for url in self.config.worker_urls:
            self.add(url)
        for url, port in self.config.prefill_urls:
            self.add(url, WorkerRole.PREFILL, bootstrap_port=port)
        for url in self.config.decode_urls:
            self.add(url, WorkerRole.DECODE)
        if self.config.blind_check_interval_s > 0:
            self._blind_task = asyncio.create_task(self._blind_loop(), name="kvroute-blind-check")
        if self.config.stall_timeout_s > 0:
            self._stall_task = asyncio.create_task(self._stall_loop(), name="kvroute-stall-check")

    async def close(self) -> None:
        for t in (self._blind_task, self._stall_task):
            if t:
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
        for url in list(self._entries):
            await self.remove(url)

    # ---- admin operations

    def add(
        self,
        url: str,
        role: WorkerRole = WorkerRole.REGULAR,
        kv_events: str | None = None,
        bootstrap_port: int | None = None,
        api_key: str | None = None,
    ) -> Worker:
        """Register `url`; returns at once (PENDING), the checks run in the background.
        `api_key`: this engine's key when it differs from `--api-key` (smg's per-worker key).

        `role`: PD pools (`prefill` / `decode`); a REGULAR worker takes the engine's own
        `disaggregation_mode`. `bootstrap_port`: a prefill server's KV bootstrap port, overriding the
        one its `/server_info` reports (None: use that one).
        """
        if self._session is None:
            raise RuntimeError("registry not started")
        url = normalize_url(url)
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise RegistryError(f"worker url must be http://host:port, got {url!r}")
        if url in self._entries:
            raise RegistryError(f"worker already registered: {url}")
        if bootstrap_port is not None and not 0 < bootstrap_port < 65536:
            raise RegistryError(f"bootstrap port out of range: {bootstrap_port}")
        worker = Worker(url=url, role=role, state=WorkerState.PENDING, bootstrap_port=bootstrap_port)
        entry = _Entry(
            worker=worker,
            client=SGLangClient(
                self._session,
                url,
                control_timeout_s=self.config.control_timeout_s,
                pool=self._pool,
                api_key=api_key or self.config.engine_api_key,
                health_path=self.config.health_check_endpoint,
                health_timeout_s=self.config.health_check_timeout_s,
            ),
            breaker=CircuitBreaker(
                self.config.circuit_failure_threshold,
                self.config.circuit_cooldown_s,
                self.config.circuit_success_threshold,
                max_probes=self.config.circuit_half_open_probes,
            ),
            kv_override=kv_events or self.config.kv_events_dict.get(url),
            bootstrap_override=bootstrap_port,
        )
        self._entries[url] = entry
        self.router.add_worker(worker)
        entry.task = asyncio.create_task(self._run(entry), name=f"kvroute-worker {url}")
        log.info("worker %s added (registering in the background)", url)
        return worker

    async def remove(self, url: str) -> None:
        """Stop the worker's tasks, unsubscribe its events and drop its index entries."""
        url = normalize_url(url)
        entry = self._entries.pop(url, None)
        if entry is None:
            raise RegistryError(f"unknown worker: {url}")
        if entry.reopen_handle:
            entry.reopen_handle.cancel()
        if entry.retire_task and entry.retire_task is not asyncio.current_task():
            entry.retire_task.cancel()
        for t in (entry.task, entry.stall_probe):
            if t:
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
        if entry.subscribed:
            with contextlib.suppress(Exception):
                await self.router.unsubscribe(url)
        self.router.remove_worker(url)
        self._pool.forget_host(entry.client.key)  # idle keep-alive connections go with the worker
        self.metrics.forget_worker(url)
        self._update_ready()
        log.info("worker %s removed", url)

    def drain(self, url: str) -> Worker:
        """No new requests go to the worker; requests in flight finish."""
        entry = self._get(url)
        entry.worker.state = WorkerState.DRAINING
        entry.worker.reason = "draining (admin)"
        self._update_ready()
        return entry.worker

    def retire(self, url: str, reason: str, poll_s: float = 0.2) -> Worker:
        """Drain, then remove once none of this router's requests is in flight on the worker: streams
        finish, nothing is cut. `undrain` or `remove` cancels it. For discovery (a worker that vanished)
        and scaling; `poll_s`: seconds between looks at the worker's open requests."""
        entry = self._get(url)
        worker = self.drain(url)
        worker.reason = reason
        if entry.retire_task is None or entry.retire_task.done():
            entry.retire_task = asyncio.create_task(
                self._remove_when_idle(entry, poll_s), name=f"kvroute-retire {worker.url}"
            )
        return worker

    def retiring(self, url: str) -> bool:
        entry = self._entries.get(normalize_url(url))
        return entry is not None and entry.retire_task is not None and not entry.retire_task.done()

    async def _remove_when_idle(self, entry: _Entry, poll_s: float) -> None:
        url = entry.worker.url
        while self.router.load.open_tickets(url) > 0:
            await asyncio.sleep(poll_s)
        if self._entries.get(url) is entry:
            await self.remove(url)

    def undrain(self, url: str) -> Worker:
        entry = self._get(url)
        if entry.retire_task is not None:
            entry.retire_task.cancel()
            entry.retire_task = None
        if entry.worker.state is WorkerState.DRAINING:
            self._set_state(entry, WorkerState.HEALTHY if entry.registered_at else WorkerState.PENDING, None)
        return entry.worker

    def _get(self, url: str) -> _Entry:
        entry = self._entries.get(normalize_url(url))
        if entry is None:
            raise RegistryError(f"unknown worker: {url}")
        return entry

    # ---- queries

    def __contains__(self, url: str) -> bool:
        return normalize_url(url) in self._entries

    def urls(self) -> list[str]:
        return list(self._entries)

    def client(self, url: str) -> SGLangClient:
        return self._get(url).client

    def registering(self) -> bool:
        """Some worker added in the last minute is still registering: it may become routable soon (a
        worker pending for longer is down, and holding requests for it would only delay their 503)."""
        cutoff = time.monotonic() - 60.0
        return any(
            e.worker.state is WorkerState.PENDING and e.added_at > cutoff for e in self._entries.values()
        )

    def healthy_urls(self) -> list[str]:
        return [u for u, e in self._entries.items() if e.worker.state is WorkerState.HEALTHY]

    def ready(self) -> bool:
        """A healthy worker exists; in PD mode, a healthy prefill AND a healthy decode worker."""
        roles = {e.worker.role for e in self._entries.values() if e.worker.state is WorkerState.HEALTHY}
        if self.config.pd_disaggregation:
            return WorkerRole.PREFILL in roles and WorkerRole.DECODE in roles
        return bool(roles)

    def models(self) -> list[str]:
        seen: dict[str, None] = {}
        for e in self._entries.values():
            if e.worker.state in (WorkerState.HEALTHY, WorkerState.DRAINING):
                for m in e.models or ([e.worker.model] if e.worker.model else []):
                    seen[m] = None
        return list(seen)

    def describe(self, url: str) -> dict[str, Any]:
        e = self._get(url)
        w = e.worker
        return {
            "url": w.url,
            "role": w.role.value,
            "state": w.state.value,
            "reason": w.reason,
            "model": w.model,
            "page_size": w.page_size,
            "max_total_tokens": w.max_total_tokens,
            "bootstrap_port": w.bootstrap_port,
            "kv_events_endpoint": w.kv_events_endpoint,
            "kv_events_replay_endpoint": w.kv_events_replay_endpoint,
            "kv_events_socket": "bind" if w.kv_events_bind else "connect",
            "kv_events_ranks": len(w.kv_event_sources) if self.config.dp_aware and w.dp_size > 1 else 1,
            "dp_size": w.dp_size,
            "kv_events_subscribed": e.subscribed,
            "kv_events_error": e.subscribe_error,
            "circuit": e.breaker.poll(),
            "consecutive_failures": e.breaker.failures,
            "circuit_probes_in_flight": e.breaker.probes,
            "circuit_openings_vetoed": e.breaker.vetoed,
            "last_health_error": e.last_health_error,
            "stalled": e.stalled,
            "load": {
                "in_flight": w.load.in_flight,
                "pending_prefill_tokens": w.load.pending_prefill_tokens,
                "active_blocks": w.load.active_blocks,
                "engine_running": w.load.engine_running,
                "engine_queued": w.load.engine_queued,
                "engine_token_usage": w.load.engine_token_usage,
            },
        }

    def describe_all(self) -> list[dict[str, Any]]:
        return [self.describe(u) for u in self._entries]

    # ---- request outcomes (from the proxy)

    def breaker_allows(self, url: str) -> bool:
        """Whether a request could go to `url` now (closed, or half-open with a probe slot free)."""
        e = self._entries.get(url)
        return e is not None and e.breaker.allows()

    def begin_attempt(self, url: str) -> Admission:
        """Admit one attempt on `url`: "probe" takes a half-open probe slot (`end_probe` returns it)."""
        e = self._entries.get(url)
        return "no" if e is None else e.breaker.begin()

    def end_probe(self, url: str) -> None:
        e = self._entries.get(url)
        if e is not None:
            e.breaker.end()

    def circuit_states(self) -> dict[str, str]:
        return {u: e.breaker.poll() for u, e in self._entries.items()}

    def record_success(self, url: str) -> None:
        e = self._entries.get(url)
        if e is not None and e.breaker.record_success():
            log.info("worker %s circuit closed", url)

    def _may_eject(self) -> bool:
        """The fleet-wide cap: how many breakers are out already, how many workers still route."""
        ejected = in_rotation = 0
        for e in self._entries.values():
            state = e.breaker.poll()
            if state != "closed":
                ejected += 1
            elif e.worker.state is WorkerState.HEALTHY:
                in_rotation += 1
        return self.ejection_cap.may_eject(ejected, in_rotation)

    def record_failure(self, url: str, why: str) -> None:
        e = self._entries.get(url)
        if e is None:
            return
        b = e.breaker
        at_threshold = b.poll() == "closed" and b.failures + 1 >= b.failure_threshold > 0
        may_open = not at_threshold or self._may_eject()  # the fleet count only when it matters
        if not b.record_failure(may_open):
            n = b.vetoed
            if not may_open and _power_of_ten(n):  # rate-limited: 1st, 10th, 100th... veto
                log.warning(
                    "worker %s: circuit kept closed after %d failures in a row (last: %s): the fleet cap "
                    "(max %.0f%% ejected, min %d in rotation) is reached; %d openings refused so far",
                    url,
                    e.breaker.failures,
                    why,
                    self.config.circuit_max_ejection_percent,
                    self.config.circuit_min_in_rotation,
                    n,
                )
            return
        self.metrics.circuit_opened.labels(url).inc()
        log.warning(
            "worker %s circuit open after failures (last: %s); retry in %.0fs",
            url,
            why,
            self.config.circuit_cooldown_s,
        )
        if e.worker.state is WorkerState.HEALTHY:
            self._set_state(e, WorkerState.UNHEALTHY, f"circuit open: {why}")
        if e.reopen_handle:
            e.reopen_handle.cancel()
        e.reopen_handle = asyncio.get_running_loop().call_later(
            self.config.circuit_cooldown_s, self._half_open, url
        )

    def _half_open(self, url: str) -> None:
        """Cooldown over: let traffic probe the worker again (a failure reopens the breaker)."""
        e = self._entries.get(url)
        if e is None:
            return
        e.reopen_handle = None
        if (
            e.breaker.poll() == "half_open"
            and not e.stalled
            and e.worker.state is WorkerState.UNHEALTHY
            and e.health_failures < max(1, self.config.health_failure_threshold)
        ):
            self._set_state(e, WorkerState.HEALTHY, None)
            log.info("worker %s circuit half-open", url)

    # ---- background work

    def _set_state(self, e: _Entry, state: WorkerState, reason: str | None) -> None:
        was = e.worker.state
        e.worker.state = state
        e.worker.reason = reason
        self._update_ready()
        if state is WorkerState.HEALTHY and was is not WorkerState.HEALTHY:
            ready = getattr(self.router, "worker_ready", None)  # admission's queue drains into it
            if ready is not None and self.router.get_worker(e.worker.url) is e.worker:
                ready(e.worker)

    def _update_ready(self) -> None:
        if self.ready():
            self.ready_event.set()
        else:
            self.ready_event.clear()

    async def _run(self, e: _Entry) -> None:
        try:
            if not await self._register(e):
                return
            await asyncio.gather(self._health_loop(e), self._load_loop(e))
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not kill the process; the worker just stops being checked
            log.exception("worker %s: registry task failed", e.worker.url)
            self._set_state(e, WorkerState.UNHEALTHY, "internal error in registry task (see log)")

    async def _register(self, e: _Entry) -> bool:
        """Health until it answers, then /server_info and /model_info; checks the page size. A worker
        whose info is refused (401/403: the engine runs with --api-key) is REJECTED with the reason; one
        whose info fails otherwise is retried; one not through by `worker_startup_timeout_s` is REJECTED."""
        w = e.worker
        cfg = self.config
        started = time.monotonic()
        if cfg.worker_startup_delay_s > 0:
            await asyncio.sleep(cfg.worker_startup_delay_s)
        attempts = 0
        info: dict[str, Any] = {}
        while True:
            stage = cfg.health_check_endpoint
            try:
                headers = await e.client.health()
                if self.instance_id and headers.get(INSTANCE_HEADER) == self.instance_id:
                    raise _Refused(
                        "this URL reaches the router itself (a worker must be an engine, not this router)"
                    )
                stage = "/server_info"
                info = await self._server_info(e, behind_router=INSTANCE_HEADER in headers)
                break
            except _Refused as exc:
                self._set_state(e, WorkerState.REJECTED, exc.reason)
                log.error("worker %s REJECTED: %s", w.url, exc.reason)
                return False
            except UpstreamError as exc:
                attempts += 1
                w.reason = f"waiting for {stage}: {exc.message}"
                if attempts == 1 or attempts % 30 == 0:
                    log.info("worker %s not up yet (%s)", w.url, w.reason)
            timeout = cfg.worker_startup_timeout_s
            if timeout > 0 and time.monotonic() - started >= timeout:
                reason = f"not ready within --worker-startup-timeout-secs {timeout:g} ({w.reason})"
                self._set_state(e, WorkerState.REJECTED, reason)
                log.error("worker %s REJECTED: %s", w.url, reason)
                return False
            await asyncio.sleep(cfg.registration_retry_s)
        minfo: dict[str, Any] = {}
        try:
            minfo = await e.client.model_info()
        except UpstreamError as exc:
            log.info("worker %s: /model_info unavailable (%s)", w.url, exc.message)
        e.server_info = info
        self._apply_info(e, info, minfo)
        problem = self._page_size_problem(w, info)
        if problem:
            self._set_state(e, WorkerState.REJECTED, problem)
            log.error("worker %s REJECTED: %s", w.url, problem)
            return False
        with contextlib.suppress(UpstreamError):
            e.models = [str(m["id"]) for m in await e.client.models() if "id" in m]
        e.registered_at = time.monotonic()
        await self._subscribe(e)
        if w.state is WorkerState.PENDING:
            self._set_state(e, WorkerState.HEALTHY, None)
        log.info(
            "worker %s healthy (model=%s page_size=%s role=%s events=%s)",
            w.url,
            w.model,
            w.page_size,
            w.role.value,
            w.kv_events_endpoint or "none",
        )
        return True

    async def _server_info(self, e: _Entry, behind_router: bool = False) -> dict[str, Any]:
        """/server_info; {} when the engine has none (404: page size unchecked, said in the log).
        `_Refused` on 401/403; other failures raise (the caller retries), except from another kvroute
        router (`behind_router`: a tier of routers has no page size or events of its own)."""
        try:
            return await e.client.server_info()
        except UpstreamHTTPError as exc:
            if behind_router and exc.status not in (401, 403):
                log.warning("worker %s is a kvroute router: /server_info %s; no page size", e.worker.url, exc)
                return {}
            if exc.status in (401, 403):
                hint = (
                    "the key given with --api-key is not the engine's"
                    if self.config.engine_api_key
                    else "the engine runs with --api-key: give kvroute the same key (--api-key)"
                )
                raise _Refused(f"/server_info answered {exc.status}: {hint}") from exc
            if exc.status == 404:
                log.warning("worker %s: no /server_info (404); page size unchecked", e.worker.url)
                return {}
            raise

    def _apply_info(self, e: _Entry, info: dict[str, Any], minfo: dict[str, Any]) -> None:
        apply_server_info(e.worker, info, minfo, e.kv_override, self.config.kv_events_socket)
        if e.bootstrap_override is not None:
            e.worker.bootstrap_port = e.bootstrap_override

    def _page_size_problem(self, w: Worker, info: dict[str, Any]) -> str | None:
        return page_size_problem(w, info, self.config.block_size)

    async def _subscribe(self, e: _Entry) -> None:
        """Follow the worker's KV events: its one stream, or with `--dp-aware` each data-parallel rank's
        (indexed per rank). Connects, or binds when the engine's publisher connects (`EventSource.bind`)."""
        w = e.worker
        sources = list(w.kv_event_sources)
        if not sources and w.kv_events_endpoint:  # set by hand (tests, library use)
            sources = [EventSource(0, w.kv_events_endpoint, w.kv_events_replay_endpoint, w.kv_events_topic)]
        if not sources:
            return
        ranked = self.config.dp_aware and w.dp_size > 1 and len(sources) > 1
        if not ranked:
            sources = sources[:1]
        try:
            for src in sources:
                await self.router.subscribe(
                    w.url,
                    src.endpoint,
                    src.replay_endpoint,
                    src.topic,
                    bind=src.bind,
                    rank=src.rank if ranked else None,
                    ranks=len(sources) if ranked else 0,
                )
            e.subscribed = True
            e.subscribe_error = None
        except Exception as exc:  # the worker still serves; it is reported blind instead
            e.subscribe_error = f"{type(exc).__name__}: {exc}"
            log.error(
                "worker %s: cannot %s KV events at %s: %s",
                w.url,
                "bind for" if src.bind else "subscribe to",
                src.endpoint,
                exc,
            )

    async def _health_loop(self, e: _Entry) -> None:
        interval = self.config.health_check_interval_s
        if interval <= 0:
            return
        threshold = max(1, self.config.health_failure_threshold)
        w = e.worker
        while True:
            await asyncio.sleep(interval)
            try:
                await e.client.health()
            except UpstreamError as exc:
                e.health_successes = 0
                e.health_failures += 1
                e.last_health_error = exc.message
                self.metrics.health_check_failures.labels(w.url).inc()
                if e.health_failures >= threshold and w.state is WorkerState.HEALTHY:
                    self._set_state(e, WorkerState.UNHEALTHY, f"health check failed: {exc.message}")
                    log.warning("worker %s unhealthy: %s", w.url, exc.message)
                continue
            e.health_failures = 0
            e.last_health_error = None
            e.health_successes += 1
            if (
                w.state is WorkerState.UNHEALTHY
                and e.breaker.poll() != "open"
                and not e.stalled
                and e.health_successes >= self.config.health_success_threshold
            ):
                self._set_state(e, WorkerState.HEALTHY, None)
                log.info("worker %s healthy again", w.url)

    async def _load_loop(self, e: _Entry) -> None:
        interval = self.config.load_poll_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                load = await e.client.get_load()
            except UpstreamHTTPError as exc:
                if exc.status == 404:
                    log.info("worker %s has no /get_load or /v1/loads; load polling off", e.worker.url)
                    return
                continue
            except UpstreamError:
                continue
            self.router.update_engine_load(e.worker.url, load.running, load.queued, load.token_usage)

    # ---- stall and wedge detection

    async def _stall_loop(self) -> None:
        """A worker with exchanges in flight and no byte from it for `stall_timeout_s` is suspect: one
        `/health_generate` (a real one-token generation; `/health` stays 200 on a wedged engine) decides.
        Failed: out of routing, its exchanges failed (retried elsewhere where nothing reached the client).
        Passed: only slow (e.g. a long non-streamed answer); the stall clock restarts. A stalled worker is
        probed again every half period and comes back when a probe passes."""
        bound = self.config.stall_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, bound / 4))
            now = loop.time()
            for e in list(self._entries.values()):
                if e.stall_probe is not None and not e.stall_probe.done():
                    continue
                if e.stalled:
                    if now - e.stalled_probe_at >= bound / 2:
                        e.stalled_probe_at = now
                        e.stall_probe = asyncio.create_task(self._probe_stalled(e))
                elif self._pool.stalled_for(e.client.key, now) >= bound:
                    e.stall_probe = asyncio.create_task(self._probe_suspect(e))

    async def _probe_suspect(self, e: _Entry) -> None:
        key = e.client.key
        waited = self._pool.stalled_for(key, asyncio.get_running_loop().time())
        try:
            await e.client.health_generate(timeout=self.config.control_timeout_s or None)
        except UpstreamError as exc:
            if e.worker.url not in self._entries:
                return
            n = self._pool.in_flight(key)
            why = f"stalled: {n} requests in flight, no byte for {waited:.0f}s; /health_generate: "
            why += exc.message
            e.stalled = True
            e.stalled_probe_at = asyncio.get_running_loop().time()
            self.metrics.stalls.labels(e.worker.url).inc()
            if e.worker.state in (WorkerState.HEALTHY, WorkerState.DRAINING):
                self._set_state(e, WorkerState.UNHEALTHY, why)
            failed = self._pool.fail_busy(key, f"worker {e.worker.url} stalled")
            log.warning("worker %s out of routing: %s (%d requests failed over)", e.worker.url, why, failed)
            return
        self._pool.mark_progress(key, asyncio.get_running_loop().time())

    async def _probe_stalled(self, e: _Entry) -> None:
        try:
            await e.client.health_generate(timeout=self.config.control_timeout_s or None)
        except UpstreamError:
            return
        e.stalled = False
        if e.worker.state is WorkerState.UNHEALTHY and e.breaker.poll() != "open":
            self._set_state(e, WorkerState.HEALTHY, None)
        log.info("worker %s generates again: back in routing", e.worker.url)

    async def _blind_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.blind_check_interval_s)
            self.check_blind()

    def check_blind(self) -> list[str]:
        """Log workers newly found serving traffic with no KV events; returns the current blind set."""
        blind = blind_workers(self.router)
        for url, e in self._entries.items():
            if url in blind and not e.reported_blind:
                log.warning(
                    "worker %s serves traffic but no KV events arrived (endpoint=%s, router %s): routing "
                    "to it is blind; check --kv-events / --kv-events-socket and the engine's "
                    "--kv-events-config (a concrete endpoint address makes SGLang connect: kvroute binds)",
                    url,
                    e.worker.kv_events_endpoint or "none",
                    "binds" if e.worker.kv_events_bind else "connects",
                )
            e.reported_blind = url in blind
        return blind


def _power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


def blind_workers(router: Any) -> list[str]:
    fn = getattr(router, "blind_workers", None)
    if callable(fn):
        return list(fn())
    stats = router.index_stats()
    b = stats.get("blind_workers") if isinstance(stats, dict) else None
    return list(b or [])
