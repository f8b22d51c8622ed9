"""The worker registry: registration in the background, health checks, circuit breakers, load polls.

The `Router` (library core) owns the `Worker` objects and decides; this module keeps them true:
it moves `Worker.state` between PENDING / HEALTHY / UNHEALTHY / DRAINING / REJECTED, subscribes the
index to each worker's KV events, corrects loads from `/get_load`, and reports workers that serve
traffic while their events never arrive ("blind"). One asyncio task per worker; all are cancelled
on removal and on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from engines.errors import UpstreamError, UpstreamHTTPError
from engines.sglang import Http1Pool, SGLangClient
from router.config import RouterConfig, normalize_url
from router.metrics import Metrics
from router.types import Worker, WorkerRole, WorkerState

log = logging.getLogger("kvroute.workers")

_WILDCARD_HOSTS = {"", "*", "0.0.0.0", "::", "[::]"}
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


class RegistryError(ValueError):
    """An admin operation on the registry cannot be done (unknown or duplicate worker, bad URL)."""


class CircuitBreaker:
    """Per-worker breaker on request outcomes.

    closed --N consecutive failures--> open --cooldown--> half_open --M successes--> closed;
    any failure in half_open opens it again. `failure_threshold == 0` disables it (always closed).
    """

    def __init__(
        self,
        failure_threshold: int,
        cooldown_s: float,
        success_threshold: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.success_threshold = max(1, success_threshold)
        self._clock = clock
        self.state = "closed"
        self.failures = 0
        self.successes = 0
        self.opened_at = 0.0

    def poll(self) -> str:
        """Advance open -> half_open once the cooldown has passed; returns the state."""
        if self.state == "open" and self._clock() - self.opened_at >= self.cooldown_s:
            self.state = "half_open"
            self.successes = 0
        return self.state

    def record_success(self) -> bool:
        """Returns True when this success closed the breaker."""
        self.failures = 0
        if self.poll() == "half_open":
            self.successes += 1
            if self.successes >= self.success_threshold:
                self.state = "closed"
                return True
        return False

    def record_failure(self) -> bool:
        """Returns True when this failure opened the breaker."""
        if self.failure_threshold <= 0:
            return False
        state = self.poll()
        self.failures += 1
        if state == "half_open" or (state == "closed" and self.failures >= self.failure_threshold):
            self.state = "open"
            self.opened_at = self._clock()
            self.successes = 0
            return True
        return False


@dataclass
class _Entry:
    """What the registry knows of a worker beyond the shared `Worker` record."""

    worker: Worker
    client: SGLangClient
    breaker: CircuitBreaker
    kv_override: str | None = None
    task: asyncio.Task[None] | None = None
    registered_at: float | None = None
    health_failures: int = 0
    last_health_error: str | None = None
    subscribed: bool = False
    subscribe_error: str | None = None
    models: list[str] = field(default_factory=list)
    server_info: dict[str, Any] = field(default_factory=dict)
    reported_blind: bool = False
    reopen_handle: asyncio.TimerHandle | None = None


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
        self.ready_event = asyncio.Event()

    # ---- lifecycle

    async def start(self, session: aiohttp.ClientSession, pool: Http1Pool | None = None) -> None:
        """`session`: control calls (health, info, loads); `pool`: the proxy's request connections."""
        self._session = session
        if pool is not None:
            self._pool = pool
        for url in self.config.worker_urls:
            self.add(url)
        if self.config.blind_check_interval_s > 0:
            self._blind_task = asyncio.create_task(self._blind_loop(), name="kvroute-blind-check")

    async def close(self) -> None:
        if self._blind_task:
            self._blind_task.cancel()
            await asyncio.gather(self._blind_task, return_exceptions=True)
        for url in list(self._entries):
            await self.remove(url)

    # ---- admin operations

    def add(self, url: str, role: WorkerRole = WorkerRole.REGULAR, kv_events: str | None = None) -> Worker:
        """Register `url`; returns at once (PENDING), the checks run in the background."""
        if self._session is None:
            raise RuntimeError("registry not started")
        url = normalize_url(url)
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise RegistryError(f"worker url must be http://host:port, got {url!r}")
        if url in self._entries:
            raise RegistryError(f"worker already registered: {url}")
        worker = Worker(url=url, role=role, state=WorkerState.PENDING)
        entry = _Entry(
            worker=worker,
            client=SGLangClient(
                self._session, url, control_timeout_s=self.config.control_timeout_s, pool=self._pool
            ),
            breaker=CircuitBreaker(
                self.config.circuit_failure_threshold,
                self.config.circuit_cooldown_s,
                self.config.circuit_success_threshold,
            ),
            kv_override=kv_events or self.config.kv_events_dict.get(url),
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
        if entry.task:
            entry.task.cancel()
            await asyncio.gather(entry.task, return_exceptions=True)
        if entry.subscribed:
            with contextlib.suppress(Exception):
                await self.router.unsubscribe(url)
        self.router.remove_worker(url)
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

    def undrain(self, url: str) -> Worker:
        entry = self._get(url)
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

    def healthy_urls(self) -> list[str]:
        return [u for u, e in self._entries.items() if e.worker.state is WorkerState.HEALTHY]

    def ready(self) -> bool:
        return any(e.worker.state is WorkerState.HEALTHY for e in self._entries.values())

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
            "kv_events_subscribed": e.subscribed,
            "kv_events_error": e.subscribe_error,
            "circuit": e.breaker.poll(),
            "consecutive_failures": e.breaker.failures,
            "last_health_error": e.last_health_error,
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
        e = self._entries.get(url)
        return e is not None and e.breaker.poll() != "open"

    def record_success(self, url: str) -> None:
        e = self._entries.get(url)
        if e is not None and e.breaker.record_success():
            log.info("worker %s circuit closed", url)

    def record_failure(self, url: str, why: str) -> None:
        e = self._entries.get(url)
        if e is None or not e.breaker.record_failure():
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
            and e.worker.state is WorkerState.UNHEALTHY
            and e.health_failures < max(1, self.config.health_failure_threshold)
        ):
            self._set_state(e, WorkerState.HEALTHY, None)
            log.info("worker %s circuit half-open", url)

    # ---- background work

    def _set_state(self, e: _Entry, state: WorkerState, reason: str | None) -> None:
        e.worker.state = state
        e.worker.reason = reason
        self._update_ready()

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
        """/health until it answers, then /server_info and /model_info; checks the page size."""
        w = e.worker
        attempts = 0
        while True:
            try:
                await e.client.health()
                break
            except UpstreamError as exc:
                attempts += 1
                w.reason = f"waiting for /health: {exc.message}"
                if attempts == 1 or attempts % 30 == 0:
                    log.info("worker %s not up yet (%s)", w.url, exc.message)
                await asyncio.sleep(self.config.registration_retry_s)
        info: dict[str, Any] = {}
        try:
            info = await e.client.server_info()
        except UpstreamError as exc:
            log.warning("worker %s: /server_info unavailable (%s); page size unchecked", w.url, exc.message)
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

    def _apply_info(self, e: _Entry, info: dict[str, Any], minfo: dict[str, Any]) -> None:
        w = e.worker
        ps = info.get("page_size")
        w.page_size = int(ps) if isinstance(ps, int) else None
        w.model = (
            minfo.get("served_model_name")
            or info.get("served_model_name")
            or minfo.get("model_path")
            or info.get("model_path")
            or w.model
        )
        mode = minfo.get("disaggregation_mode") or info.get("disaggregation_mode")
        if mode in ("prefill", "decode") and w.role is WorkerRole.REGULAR:
            w.role = WorkerRole(mode)
        bp = info.get("disaggregation_bootstrap_port")
        if isinstance(bp, int):
            w.bootstrap_port = bp
        mtt = info.get("max_total_num_tokens", info.get("max_total_tokens"))
        if isinstance(mtt, int):
            w.max_total_tokens = mtt
        endpoint, replay, topic = discover_kv_events(w.url, info)
        if e.kv_override:
            endpoint, replay = e.kv_override, None
        w.kv_events_endpoint = endpoint
        w.kv_events_replay_endpoint = replay
        w.kv_events_topic = topic

    def _page_size_problem(self, w: Worker, info: dict[str, Any]) -> str | None:
        bs = self.config.block_size
        if w.page_size is not None and w.page_size != bs:
            return (
                f"engine page_size {w.page_size} != router --block-size {bs}: KV-aware routing would "
                f"match nothing; start the engine with --page-size {bs} or the router with "
                f"--block-size {w.page_size}"
            )
        kv = info.get("kv_events")
        if isinstance(kv, dict) and isinstance(kv.get("block_size"), int) and kv["block_size"] != bs:
            return f"engine KV-event block_size {kv['block_size']} != router --block-size {bs}"
        return None

    async def _subscribe(self, e: _Entry) -> None:
        w = e.worker
        if not w.kv_events_endpoint:
            return
        try:
            await self.router.subscribe(
                w.url, w.kv_events_endpoint, w.kv_events_replay_endpoint, w.kv_events_topic
            )
            e.subscribed = True
            e.subscribe_error = None
        except Exception as exc:  # the worker still serves; it is reported blind instead
            e.subscribe_error = f"{type(exc).__name__}: {exc}"
            log.error("worker %s: cannot subscribe to KV events at %s: %s", w.url, w.kv_events_endpoint, exc)

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
                e.health_failures += 1
                e.last_health_error = exc.message
                self.metrics.health_check_failures.labels(w.url).inc()
                if e.health_failures >= threshold and w.state is WorkerState.HEALTHY:
                    self._set_state(e, WorkerState.UNHEALTHY, f"health check failed: {exc.message}")
                    log.warning("worker %s unhealthy: %s", w.url, exc.message)
                continue
            e.health_failures = 0
            e.last_health_error = None
            if w.state is WorkerState.UNHEALTHY and e.breaker.poll() != "open":
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
                    "worker %s serves traffic but no KV events arrived (endpoint=%s): routing to it is "
                    "blind; check --kv-events / the engine's --kv-events-config",
                    url,
                    e.worker.kv_events_endpoint or "none",
                )
            e.reported_blind = url in blind
        return blind


def blind_workers(router: Any) -> list[str]:
    fn = getattr(router, "blind_workers", None)
    if callable(fn):
        return list(fn())
    stats = router.index_stats()
    b = stats.get("blind_workers") if isinstance(stats, dict) else None
    return list(b or [])


def discover_kv_events(url: str, info: dict[str, Any]) -> tuple[str | None, str | None, str]:
    """Event endpoint from `/server_info`, in the forms SGLang versions report it:
    0.5.23's `kv_events` descriptor (`endpoint_host` + `endpoint_port_base`), a source dict with an
    `endpoint` (`kv_events` or the `kv_event_sources` list), else the `kv_events_config` server arg.

    Wildcard or loopback hosts are replaced by the worker URL's host (the address the router can
    dial). Only rank 0 of a data-parallel engine is returned.
    """
    host = urlsplit(url).hostname or "127.0.0.1"
    kv = info.get("kv_events")
    if isinstance(kv, dict) and isinstance(kv.get("endpoint_port_base"), int):
        h = str(kv.get("endpoint_host") or "")
        h = host if h in _WILDCARD_HOSTS else h
        endpoint = f"tcp://{h}:{kv['endpoint_port_base']}"
        rp = kv.get("replay_endpoint_port_base")
        replay = f"tcp://{h}:{rp}" if isinstance(rp, int) else None
        return endpoint, replay, str(kv.get("topic") or "")
    sources = info.get("kv_event_sources")
    source = kv if isinstance(kv, dict) and isinstance(kv.get("endpoint"), str) else None
    if source is None and isinstance(sources, list):
        ranked = [s for s in sources if isinstance(s, dict) and isinstance(s.get("endpoint"), str)]
        ranked.sort(key=lambda s: s.get("dp_rank") or 0)
        source = ranked[0] if ranked else None
    cfg: Any = source
    if cfg is None:
        cfg = info.get("kv_events_config")
        if isinstance(cfg, str) and cfg.strip():
            try:
                cfg = orjson.loads(cfg)
            except orjson.JSONDecodeError:
                return None, None, ""
    if isinstance(cfg, dict) and isinstance(cfg.get("endpoint"), str):
        replay = cfg.get("replay_endpoint")
        return (
            _dialable(cfg["endpoint"], host),
            _dialable(replay, host) if isinstance(replay, str) else None,
            str(cfg.get("topic") or ""),
        )
    return None, None, ""


def _dialable(endpoint: str, host: str) -> str:
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme != "tcp":
        return endpoint
    h, _, port = rest.rpartition(":")
    if h in _WILDCARD_HOSTS or (h in _LOOPBACK_HOSTS and host not in _LOOPBACK_HOSTS):
        h = host
    return f"tcp://{h}:{port}"
