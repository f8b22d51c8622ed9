"""Runs the configured discovery source for the app's lifetime, feeding the registry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from kvroute.router.config import ConfigError, RouterConfig
from kvroute.router.discovery.base import DiscoverySource
from kvroute.router.discovery.sync import DiscoveryObserver, DiscoverySync, Registry
from kvroute.router.types import WorkerRole

log = logging.getLogger("kvroute.discovery")


def build_source(config: RouterConfig, **overrides: Any) -> DiscoverySource | None:
    """The source `config` asks for (None without discovery); `overrides` go to its constructor (tests:
    a Kubernetes `configuration`, a DNS `resolver`). ConfigError when its extra is not installed."""
    provider = config.discovery
    if provider is None:
        return None
    if provider == "file":
        from kvroute.router.discovery.file import FileSource

        assert config.discovery_file is not None  # checked by RouterConfig
        return FileSource(config.discovery_file, config.discovery_check_interval_s, **overrides)
    roles = (WorkerRole.REGULAR, WorkerRole.PREFILL, WorkerRole.DECODE)
    try:
        if provider == "kubernetes":
            _require("kubernetes_asyncio", "kubernetes", "Kubernetes discovery")
            from kvroute.router.discovery.kubernetes import KubernetesSource

            selectors = (config.selector, config.prefill_selector, config.decode_selector)
            return KubernetesSource(
                [(role, s) for role, s in zip(roles, selectors, strict=True) if s],
                port=config.service_discovery_port,
                namespace=config.service_discovery_namespace,
                bootstrap_annotation=config.bootstrap_port_annotation,
                **overrides,
            )
        _require("dns", "dns", "DNS discovery")
        from kvroute.router.discovery.dns import DnsSource

        names = (
            config.discovery_dns_name,
            config.discovery_dns_prefill_name,
            config.discovery_dns_decode_name,
        )
        return DnsSource(
            [(role, n) for role, n in zip(roles, names, strict=True) if n],
            record=config.discovery_dns_record,
            port=config.service_discovery_port,
            interval_s=config.discovery_check_interval_s,
            grace_s=config.discovery_dns_grace_s,
            nameserver=config.discovery_dns_server,
            **overrides,
        )
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from exc


def _require(module: str, extra: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{what} needs the '{extra}' extra ({module} is not installed): pip install 'kvroute[{extra}]'"
        )


@contextlib.asynccontextmanager
async def discovery_context(
    source: DiscoverySource | None, registry: Registry, observer: DiscoveryObserver | None = None
) -> AsyncIterator[DiscoverySync | None]:
    """Run `source` in the background until the context exits; yields its `DiscoverySync` (None: off)."""
    if source is None:
        yield None
        return
    sync = DiscoverySync(registry, source.name, observer)

    async def run() -> None:
        try:
            await source.run(sync)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in a source: say so loudly; the registered workers keep serving
            log.exception("discovery (%s) stopped; workers are no longer discovered", source.name)

    task = asyncio.create_task(run(), name=f"kvroute-discovery {source.name}")
    log.info("discovery: %s", source.name)
    try:
        yield sync
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
