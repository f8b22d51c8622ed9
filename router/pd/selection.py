"""Pair selection and conditional disaggregation: which prefill and which decode worker serve a request,
or whether a short uncached prompt skips the prefill pool and is served by one local worker."""

from __future__ import annotations

from collections.abc import Callable, Collection

from kvroute.router.core import Router
from kvroute.router.load import Ticket
from kvroute.router.pd.model import PDConfig, PDRoute
from kvroute.router.policies import make_policy
from kvroute.router.policies.base import NoWorkerAvailable, Policy, PolicyContext
from kvroute.router.types import Decision, RoutingRequest, Worker, WorkerRole


class PDSelector:
    """Per-role policies over the router's candidates: `--prefill-policy`, `--decode-policy`.

    The prefill policy (default `kv_aware` with `decode_weight=0`: overlap and queued prefill tokens,
    nothing else runs on a prefill server) and the decode policy (default `least_load`: pending plus
    active KV blocks, floored by the engine's token usage, ties to fewer requests in flight) read the
    router's shared index and in-flight predictions. The local pool uses the router's own policy.
    Selection only reads; `on_routed` reserves load through the router and lets the policy learn.
    """

    def __init__(self, router: Router, config: PDConfig) -> None:
        self.router = router
        ctx = PolicyContext(
            kv_index=router.index,
            inflight=router.load.inflight,
            clock=router.clock,
            block_counts=router.index.block_count,
        )
        p_params = dict(config.prefill_policy_params)
        if config.prefill_policy == "kv_aware":
            p_params.setdefault("decode_weight", 0.0)  # nothing decodes on a prefill server
        self.policies: dict[WorkerRole, Policy] = {
            WorkerRole.PREFILL: make_policy(config.prefill_policy, p_params, ctx),
            WorkerRole.DECODE: make_policy(config.decode_policy, dict(config.decode_policy_params), ctx),
        }

    def workers(self, role: WorkerRole | None = None) -> list[Worker]:
        return self.router.workers(role)

    def select(self, request: RoutingRequest, role: WorkerRole, exclude: Collection[str] = ()) -> Decision:
        policy = self.policies.get(role)
        if policy is None:
            return self.router.select(request, role=role, exclude=exclude)
        cands = self.router.candidates(request, role, exclude)
        if not cands:
            raise NoWorkerAvailable(f"no healthy {role.value} worker available")
        return policy.select(request, cands)

    def on_routed(
        self, decision: Decision, request: RoutingRequest, role: WorkerRole, priority: int = 0
    ) -> Ticket:
        """Reserve the request's load (`priority`: its class's, which admission's saturation reads)."""
        ticket = self.router.on_routed(decision, request, priority=priority)
        policy = self.policies.get(role)
        worker = self.router.get_worker(decision.worker)
        if policy is not None and worker is not None:
            policy.on_routed(request, worker)
        return ticket


def prefill_queue_tokens(selector: PDSelector, exclude: Collection[str] = ()) -> int | None:
    """The least queued prefill tokens over routable prefill workers (None when none is up)."""
    queues = [
        w.load.pending_prefill_tokens
        for w in selector.workers(WorkerRole.PREFILL)
        if w.routable and w.url not in exclude
    ]
    return min(queues) if queues else None


def choose_route(
    selector: PDSelector, routing: RoutingRequest, config: PDConfig, exclude: Collection[str] = ()
) -> PDRoute:
    """Pick a pair, or a local worker when the uncached prompt is under the queue-aware threshold.

    The prefill worker is the prefill policy's pick, the decode worker the decode policy's. Local
    serving is also the fallback when no prefill worker is up (conditional disaggregation on).
    Raises `NoWorkerAvailable` when nothing can serve.
    """
    by_url = {w.url: w for w in selector.workers()}
    queue = prefill_queue_tokens(selector, exclude)
    threshold = config.local_threshold(queue) if config.conditional else 0
    if config.conditional:
        try:
            local = selector.select(routing, config.local_role, exclude)
        except NoWorkerAvailable:
            local = None
        if local is not None:
            uncached = max(0, routing.prompt_tokens - local.cached_blocks * routing.block_size)
            if uncached <= threshold or queue is None:
                why = "no prefill worker up" if queue is None else f"uncached {uncached} <= {threshold}"
                return PDRoute(by_url[local.worker], None, local, None, uncached, threshold, why)
    prefill = selector.select(routing, WorkerRole.PREFILL, exclude)
    decode = selector.select(routing, WorkerRole.DECODE, exclude)
    uncached = max(0, routing.prompt_tokens - prefill.cached_blocks * routing.block_size)
    return PDRoute(
        by_url[decode.worker],
        by_url[prefill.worker],
        decode,
        prefill,
        uncached,
        threshold,
        f"prefill {prefill.worker} ({prefill.reason}); decode {decode.worker} ({decode.reason})",
    )


def choose_admitted_route(
    selector: PDSelector,
    routing: RoutingRequest,
    config: PDConfig,
    exclude: Collection[str],
    full: Callable[[Worker], bool],
    behind: bool = False,
) -> PDRoute | None:
    """`choose_route` for admission (late binding): None while every routable prefill worker is `full`
    for a request that would be disaggregated, so it waits in the router instead of an engine's queue.

    A request conditional disaggregation serves locally goes at once, even `behind` requests already
    waiting (it takes nothing from the prefill pool they wait for); else the prefill policy picks among
    the prefill workers with room (None when `behind`: it queues after them). Raises
    `NoWorkerAvailable` when nothing could serve it even unloaded.
    """
    route = choose_route(selector, routing, config, exclude)
    if route.prefill is None:
        return route
    if behind:
        return None
    if not full(route.prefill):
        return route
    cands = selector.router.candidates(routing, WorkerRole.PREFILL, exclude)
    busy = {w.url for w in cands if full(w)}
    if len(busy) == len(cands):
        return None
    route = choose_route(selector, routing, config, {*exclude, *busy})
    return route if route.prefill is None or not full(route.prefill) else None
