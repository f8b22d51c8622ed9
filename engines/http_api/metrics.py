"""/metrics: SGLang's metric names, read from the engine at scrape time through a per-app registry."""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvroute.engines.http_api.common import STATE, ApiState


class EngineCollector:
    """Reads the engine's load at scrape time: no metric objects to keep in sync, no global registry."""

    def __init__(self, st: ApiState) -> None:
        self._st = st

    def collect(self) -> Iterable[Metric]:
        ld = self._st.core.load()
        labels = ["model_name", "engine_type", "tp_rank", "pp_rank"]
        lv = [self._st.model, "unified", "0", "0"]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(lv, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(lv, v)
            return c

        yield gauge("sglang:num_running_reqs", "The number of running requests.", ld.num_running_reqs)
        yield gauge(
            "sglang:num_queue_reqs", "The number of requests in the waiting queue.", ld.num_waiting_reqs
        )
        yield gauge("sglang:num_used_tokens", "The number of used tokens.", ld.num_used_tokens)
        yield gauge("sglang:max_total_num_tokens", "Size of the KV pool in tokens.", ld.max_total_num_tokens)
        yield gauge("sglang:token_usage", "The token usage.", ld.token_usage)
        yield gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", ld.cache_hit_rate)
        yield gauge("sglang:gen_throughput", "The generation throughput (token/s).", ld.gen_throughput)
        yield counter("sglang:prompt_tokens", "Number of prefill tokens processed.", ld.prompt_tokens_total)
        yield counter(
            "sglang:cached_tokens", "Number of prompt tokens served from the cache.", ld.cached_tokens_total
        )
        yield counter(
            "sglang:generation_tokens", "Number of generation tokens processed.", ld.generation_tokens_total
        )
        yield counter("sglang:num_requests", "Number of requests received.", ld.requests_total)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE].registry)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
