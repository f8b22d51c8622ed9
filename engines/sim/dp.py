"""A data-parallel simulated engine (`kvroute sim --dp-size N`): N `SimEngine` ranks behind one HTTP server.

As SGLang with `--dp-size N --enable-dp-attention`: each rank has its own scheduler, prefix cache and KV
event publisher (stamping `attn_dp_rank`), `/server_info` reports `dp_size` and every rank in
`kv_event_sources`, and a request runs on the rank its `routed_dp_rank` (or `data_parallel_rank`) names,
else on the next rank in turn (SGLang's DP controller's round robin).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator
from typing import Any

from kvroute.engines.core import EngineError, GenerateRequest, LoadSnapshot, ServerFacts, TokenChunk
from kvroute.engines.sim.engine import SimConfig, SimEngine
from kvroute.engines.sim.profiles import GpuProfile


class DpSimEngine:
    """`EngineCore` over the ranks; faults and config are rank 0's (set on all)."""

    def __init__(self, config: SimConfig, profile: GpuProfile, dp_size: int, registry: Any = None) -> None:
        if dp_size < 1:
            raise ValueError("dp_size must be >= 1")
        self.ranks = [
            SimEngine(
                dataclasses.replace(config, dp_rank=r, seed=config.seed * 1000 + r),
                profile,
                registry=registry,
            )
            for r in range(dp_size)
        ]
        self.config = config
        self.faults = self.ranks[0].faults
        self._next = itertools.cycle(range(dp_size))

    @property
    def capacity(self) -> int:
        """KV capacity in tokens, all ranks together."""
        return sum(r.capacity for r in self.ranks)

    @property
    def facts(self) -> ServerFacts:
        f = self.ranks[0].facts
        sources = [r.facts.kv_events.as_dict() for r in self.ranks if r.facts.kv_events is not None]
        extra = {**f.extra, "dp_size": len(self.ranks), "enable_dp_attention": True}
        if sources:
            extra["kv_event_sources"] = sources
        return dataclasses.replace(
            f, max_total_tokens=sum(r.facts.max_total_tokens for r in self.ranks), extra=extra
        )

    async def start(self) -> None:
        for r in self.ranks:
            await r.start()

    async def close(self) -> None:
        for r in self.ranks:
            await r.close()

    def is_ready(self) -> bool:
        return all(r.is_ready() for r in self.ranks)

    def set_faults(self, changes: dict[str, object]) -> None:
        for r in self.ranks:
            r.set_faults(changes)

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        rank = next(self._next) if req.dp_rank is None else req.dp_rank
        if rank >= len(self.ranks):
            raise EngineError(f"routed_dp_rank {rank} out of range (dp_size {len(self.ranks)})", 400)
        return self.ranks[rank].generate(req)

    def abort(self, rid: str | None = None, abort_all: bool = False) -> int:
        return sum(r.abort(rid, abort_all) for r in self.ranks)

    async def flush_cache(self) -> bool:
        if any(r.load().num_running_reqs or r.load().num_waiting_reqs for r in self.ranks):
            return False
        for r in self.ranks:
            await r.flush_cache()
        return True

    def load(self) -> LoadSnapshot:
        loads = [r.load() for r in self.ranks]
        prompt = sum(x.prompt_tokens_total for x in loads)
        cached = sum(x.cached_tokens_total for x in loads)
        return LoadSnapshot(
            num_running_reqs=sum(x.num_running_reqs for x in loads),
            num_waiting_reqs=sum(x.num_waiting_reqs for x in loads),
            num_used_tokens=sum(x.num_used_tokens for x in loads),
            max_total_num_tokens=sum(x.max_total_num_tokens for x in loads),
            cache_hit_rate=cached / prompt if prompt else 0.0,
            gen_throughput=sum(x.gen_throughput for x in loads),
            prompt_tokens_total=prompt,
            cached_tokens_total=cached,
            generation_tokens_total=sum(x.generation_tokens_total for x in loads),
            requests_total=sum(x.requests_total for x in loads),
        )
