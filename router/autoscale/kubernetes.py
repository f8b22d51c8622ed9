"""The Kubernetes scaler: each pool is a Deployment whose `scale` subresource the router reads and sets.

Needs `pip install 'kvroute[kubernetes]'` (kubernetes_asyncio) and RBAC on the Deployments' `scale`
subresource (get, update) and on pods (list, patch). Credentials: the in-cluster service account, else
the local kubeconfig. New pods are registered by the router's discovery (or `POST /admin/workers`); the
scaler returns none itself.

Scale-down: the router has drained the workers it chose and waited until they had nothing in flight;
the scaler marks their pods (matched by pod IP and port against the worker URLs) with the annotation
`controller.kubernetes.io/pod-deletion-cost: "-1000"`, so the ReplicaSet deletes those and not a busy
one, then lowers `spec.replicas`. Every write carries the `resourceVersion` it read: a concurrent change
answers 409 Conflict, reported and retried with backoff like a 5xx or a connection error.

Tested against recorded API responses served on loopback (tests/router/test_autoscale_k8s.py); there is
no cluster in this project's CI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from kvroute.router.autoscale.base import NewWorker, ScaleRequest, ScalerError
from kvroute.router.types import WorkerRole

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


class KubernetesScaler:
    name = "kubernetes"

    def __init__(
        self,
        namespace: str,
        deployments: Mapping[WorkerRole, str],
        api_client: Any = None,
    ) -> None:
        """`api_client`: a `kubernetes_asyncio.client.ApiClient` (tests point one at a loopback server);
        None: built on first use from the in-cluster config, else the kubeconfig."""
        try:
            from kubernetes_asyncio import client  # noqa: F401 - checked here, used below
        except ImportError as exc:
            raise ScalerError(
                "the kubernetes scaler needs kubernetes_asyncio: pip install 'kvroute[kubernetes]'",
                retryable=False,
            ) from exc
        self.namespace = namespace
        self.deployments = dict(deployments)
        self._api = api_client
        self._owns_api = api_client is None

    async def _client(self) -> Any:
        if self._api is None:
            from kubernetes_asyncio import client, config

            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                try:
                    await config.load_kube_config()
                except Exception as exc:  # noqa: BLE001 - no credentials at all: report, retry later
                    raise ScalerError(f"no Kubernetes credentials (in-cluster or kubeconfig): {exc}") from exc
            self._api = client.ApiClient()
        return self._api

    async def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        """One API call; every failure becomes a ScalerError saying what and why."""
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            return await fn(*args, **kw)
        except ApiException as exc:
            retry = exc.status in (409, 429) or (exc.status or 0) >= 500
            detail = "conflict: changed meanwhile" if exc.status == 409 else (exc.reason or "")
            raise ScalerError(f"{what}: HTTP {exc.status} {detail}".rstrip(), retryable=retry) from exc
        except (OSError, TimeoutError) as exc:
            raise ScalerError(f"{what}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # aiohttp's client errors and the like
            raise ScalerError(f"{what}: {type(exc).__name__}: {exc}") from exc

    def _deployment(self, pool: WorkerRole) -> str:
        name = self.deployments.get(pool)
        if not name:
            raise ScalerError(f"no Deployment configured for the {pool.value} pool", retryable=False)
        return name

    async def sizes(self) -> Mapping[WorkerRole, int]:
        from kubernetes_asyncio import client

        apps = client.AppsV1Api(await self._client())
        out: dict[WorkerRole, int] = {}
        for pool in self.deployments:
            name = self._deployment(pool)
            scale = await self._call(
                f"GET scale of {name}", apps.read_namespaced_deployment_scale, name, self.namespace
            )
            out[pool] = int(scale.spec.replicas or 0)
        return out

    async def scale(self, request: ScaleRequest) -> Sequence[NewWorker]:
        from kubernetes_asyncio import client

        api = await self._client()
        apps = client.AppsV1Api(api)
        name = self._deployment(request.pool)
        scale = await self._call(
            f"GET scale of {name}", apps.read_namespaced_deployment_scale, name, self.namespace
        )
        if request.remove:
            await self._mark_for_deletion(client.CoreV1Api(api), scale.status.selector, request.remove)
        scale.spec.replicas = request.target
        await self._call(
            f"PUT scale of {name} to {request.target}",
            apps.replace_namespaced_deployment_scale,
            name,
            self.namespace,
            scale,  # carries metadata.resourceVersion: 409 if the Deployment was scaled meanwhile
        )
        return []

    async def _mark_for_deletion(self, core: Any, selector: str | None, urls: Sequence[str]) -> None:
        """Lowest deletion cost on the pods behind `urls` (matched by pod IP and a container port)."""
        pods = await self._call(
            "list pods", core.list_namespaced_pod, self.namespace, label_selector=selector or ""
        )
        wanted = {(urlsplit(u).hostname, urlsplit(u).port) for u in urls}
        found = 0
        for pod in pods.items:
            ip = pod.status.pod_ip if pod.status else None
            ports = {
                p.container_port for c in (pod.spec.containers if pod.spec else []) for p in (c.ports or [])
            }
            if any(ip == h and (port is None or port in ports or not ports) for h, port in wanted):
                found += 1
                body = {"metadata": {"annotations": {DELETION_COST: "-1000"}}}
                await self._call(
                    f"annotate pod {pod.metadata.name}",
                    core.patch_namespaced_pod,
                    pod.metadata.name,
                    self.namespace,
                    body,
                )
        if found < len(urls):
            raise ScalerError(
                f"found {found} of the {len(urls)} drained workers' pods ({', '.join(urls)}): not scaling "
                "down, Kubernetes would pick the pods itself",
            )

    async def close(self) -> None:
        if self._api is not None and self._owns_api:
            await self._api.close()
