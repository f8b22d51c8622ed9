"""Kubernetes discovery: worker pods found by label selector, as sglang-router's and smg's
`--service-discovery` (same flags; `kvroute[kubernetes]` installs `kubernetes_asyncio`).

One list-then-watch loop per selector (regular, prefill, decode): list the pods (the API server filters
by the selector), then watch from the list's resourceVersion; a watch that ends is resumed from the
last version seen, a 410 Gone (history compacted) relists. A pod is a worker while it is Running,
Ready, has an IP and is not being deleted: `http://podIP:service_discovery_port`, and a prefill pod's
bootstrap port comes from its `sglang.ai/bootstrap-port` annotation (else from its `/server_info`).
API errors are reported and retried with backoff; the last known pods stay in force meanwhile.

RBAC: get, list and watch on pods in the namespace (a ClusterRole without a namespace): deploy/ and
docs/discovery.md. Tested against recorded API responses served on loopback; no cluster here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from kvroute.router.discovery.base import DiscoveredWorker, DiscoverySink, http_url, snapshot
from kvroute.router.types import WorkerRole


def pod_worker(pod: Any, role: WorkerRole, port: int, bootstrap_annotation: str) -> DiscoveredWorker | None:
    """The worker a pod (a `V1Pod`) stands for, or None while it cannot serve (sglang-router's test:
    phase Running and condition Ready; also not terminating)."""
    meta, status = pod.metadata, pod.status
    if meta is None or status is None or meta.deletion_timestamp is not None or not status.pod_ip:
        return None
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())
    if status.phase != "Running" or not ready:
        return None
    bootstrap = None
    if role is WorkerRole.PREFILL:
        raw = (meta.annotations or {}).get(bootstrap_annotation)
        with contextlib.suppress(TypeError, ValueError):
            bootstrap = int(raw) if raw is not None and 0 < int(raw) < 65536 else None
    return DiscoveredWorker(http_url(status.pod_ip, port), role, bootstrap)


class KubernetesSource:
    """Publishes the Ready pods matching each selector (see the module docstring).

    `configuration`: a `kubernetes_asyncio.client.Configuration` (tests point it at a loopback server);
    None loads the in-cluster service account, else the kubeconfig."""

    name = "kubernetes"

    def __init__(
        self,
        selectors: Sequence[tuple[WorkerRole, str]],
        port: int = 80,
        namespace: str | None = None,
        bootstrap_annotation: str = "sglang.ai/bootstrap-port",
        configuration: Any = None,
        watch_timeout_s: int = 300,
        backoff_s: tuple[float, float] = (1.0, 60.0),
    ) -> None:
        self.selectors = [(role, sel) for role, sel in selectors if sel]
        self.port = port
        self.namespace = namespace
        self.bootstrap_annotation = bootstrap_annotation
        self.configuration = configuration
        self.watch_timeout_s = watch_timeout_s
        self.backoff_s = backoff_s

    async def _api_client(self) -> Any:
        try:
            from kubernetes_asyncio import client, config
        except ImportError as exc:
            raise RuntimeError(
                "Kubernetes discovery needs kubernetes_asyncio: pip install 'kvroute[kubernetes]'"
            ) from exc
        if self.configuration is not None:
            return client.ApiClient(self.configuration)
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            await config.load_kube_config()
        return client.ApiClient()

    async def run(self, sink: DiscoverySink) -> None:
        from kubernetes_asyncio import client

        pods: dict[WorkerRole, dict[str, DiscoveredWorker | None]] = {role: {} for role, _ in self.selectors}
        published: dict[str, DiscoveredWorker] | None = None

        def changed() -> None:
            nonlocal published
            now = snapshot(w for by_pod in pods.values() for w in by_pod.values() if w is not None)
            if now != published:
                published = now
                sink.publish(now)

        api = await self._api_client()
        try:
            v1 = client.CoreV1Api(api)
            await asyncio.gather(
                *(self._follow(v1, role, sel, pods[role], changed, sink) for role, sel in self.selectors)
            )
        finally:
            await api.close()

    async def _follow(
        self,
        v1: Any,
        role: WorkerRole,
        selector: str,
        pods: dict[str, DiscoveredWorker | None],
        changed: Callable[[], None],
        sink: DiscoverySink,
    ) -> None:
        """List, then watch, for one selector, for ever."""
        from kubernetes_asyncio import watch
        from kubernetes_asyncio.client.rest import ApiException

        if self.namespace:
            list_fn: Any = v1.list_namespaced_pod
            args: tuple[Any, ...] = (self.namespace,)
        else:
            list_fn, args = v1.list_pod_for_all_namespaces, ()
        delay = self.backoff_s[0]
        where = f"pods {selector!r} in {self.namespace or 'all namespaces'}"
        while True:
            try:
                listed = await list_fn(*args, label_selector=selector)
                pods.clear()
                for pod in listed.items:
                    pods[_key(pod)] = self._worker(pod, role)
                changed()
                version = listed.metadata.resource_version
                delay = self.backoff_s[0]
                while True:  # watch until the server ends it, then resume from the last version seen
                    async with watch.Watch() as w:
                        async for event in w.stream(
                            list_fn,
                            *args,
                            label_selector=selector,
                            resource_version=version,
                            timeout_seconds=self.watch_timeout_s,
                            allow_watch_bookmarks=True,
                        ):
                            kind, pod = event["type"], event["object"]
                            version = pod.metadata.resource_version or version
                            if kind == "BOOKMARK":
                                continue
                            if kind == "DELETED":
                                pods.pop(_key(pod), None)
                            else:
                                pods[_key(pod)] = self._worker(pod, role)
                            changed()
                        version = w.resource_version or version
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status == 410:  # the version is too old: list again at once
                    continue
                sink.error(f"{where}: Kubernetes API {exc.status} {exc.reason}")
            except Exception as exc:  # network, TLS, malformed answers: report, back off, list again
                sink.error(f"{where}: {type(exc).__name__}: {str(exc)[:300]}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_s[1])

    def _worker(self, pod: Any, role: WorkerRole) -> DiscoveredWorker | None:
        return pod_worker(pod, role, self.port, self.bootstrap_annotation)


def _key(pod: Any) -> str:
    return f"{pod.metadata.namespace}/{pod.metadata.name}"
