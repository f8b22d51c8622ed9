"""The engine-core seam: what the SGLang-compatible HTTP layer needs of any engine (simulated or GPU).

The HTTP layer (`engines/http_api/`) parses SGLang/OpenAI requests into a `GenerateRequest`,
calls `EngineCore.generate`, and renders the `TokenChunk`s it yields; it never knows how tokens
are produced. A simulated engine (`engines/sim/`) and a real GPU engine implement the same Protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class EngineError(Exception):
    """The one error type an engine raises to the HTTP layer; `status` is the HTTP status to answer."""

    status: int = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(EngineError):
    """The request cannot be served as given (400), e.g. a prompt longer than the context."""

    status = 400


class BootstrapTimeout(EngineError):
    """PD disaggregation: the partner's KV for a bootstrap room never arrived (SGLang aborts with 500)."""

    status = 500


class DropConnection(EngineError):
    """Fault injection: the HTTP layer must cut the connection without a clean end of stream."""

    status = 500


@dataclass(slots=True)
class GenerateRequest:
    """One generation, already tokenized. `max_new_tokens` counts output tokens (SGLang's default 128)."""

    rid: str
    input_ids: list[int]
    max_new_tokens: int = 128
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    lora_path: str | None = None
    priority: int | None = None  # SGLang's request priority (used with --enable-priority-scheduling)
    dp_rank: int | None = None  # SGLang's `routed_dp_rank` (`data_parallel_rank`): the DP rank to run on


@dataclass(slots=True)
class TokenChunk:
    """New output tokens since the previous chunk, with the request's running totals.

    `finish_reason` is None until the last chunk, then SGLang's dict form, e.g.
    `{"type": "length", "length": 16}` or `{"type": "abort", "message": "..."}`.
    """

    token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: dict[str, Any] | None = None
    e2e_latency: float | None = None
    """Seconds from arrival to the last token on the engine's own clock (simulated time for the sim)."""
    time_stats: dict[str, float] | None = None
    """SGLang's scheduler timings for `meta_info` (`queue_time`, `prefill_waiting_latency`,
    `prefill_launch_latency`, `forward_entry_time`, `prefill_finished_time`), once known."""


@dataclass(frozen=True, slots=True)
class KvEventsInfo:
    """Where the engine publishes its KV events (SGLang 0.5.23's `kv_event_sources` entry)."""

    endpoint: str
    replay_endpoint: str | None
    topic: str
    block_size: int
    dp_rank: int = 0
    bind: bool | None = None
    """The publisher's explicit `bind` setting (SGLang 0.5.23's config key); None: SGLang's rule."""
    configured: str | None = None
    """The endpoint as configured (`--kv-events-config`), when it differs from the bound one: SGLang's
    `/server_info` reports the server argument as given, and its form says which side binds."""

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "dp_rank": self.dp_rank,
            "endpoint": self.endpoint,
            "topic": self.topic,
            "block_size": self.block_size,
        }
        if self.replay_endpoint is not None:
            d["replay_endpoint"] = self.replay_endpoint
        return d


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """Static facts `/server_info` and `/model_info` report (SGLang server-arg names)."""

    model_path: str
    page_size: int
    max_total_tokens: int
    context_length: int
    max_running_requests: int
    chunked_prefill_size: int
    disaggregation_mode: str = "null"
    disaggregation_bootstrap_port: int | None = None
    kv_events: KvEventsInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """A point-in-time load reading (feeds `/get_load`, `/v1/loads` and `/metrics`)."""

    num_running_reqs: int
    num_waiting_reqs: int
    num_used_tokens: int
    max_total_num_tokens: int
    cache_hit_rate: float
    gen_throughput: float
    prompt_tokens_total: int
    cached_tokens_total: int
    generation_tokens_total: int
    requests_total: int

    @property
    def token_usage(self) -> float:
        return self.num_used_tokens / self.max_total_num_tokens if self.max_total_num_tokens else 0.0


@runtime_checkable
class EngineCore(Protocol):
    """What the HTTP layer calls. Implementations own their scheduler, cache and event publisher."""

    @property
    def facts(self) -> ServerFacts: ...

    async def start(self) -> None:
        """Bind event sockets, start the scheduler; `facts` is complete afterwards."""

    async def close(self) -> None: ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Chunks of new tokens; the last one carries `finish_reason`. Raises `EngineError`.

        Closing the iterator early (client disconnect) aborts the request.
        """
        ...

    def abort(self, rid: str | None = None, abort_all: bool = False) -> int:
        """Abort one request (or all); returns how many were aborted."""
        ...

    async def flush_cache(self) -> bool:
        """Empty the prefix cache; False (SGLang: refused) while requests are running or waiting."""
        ...

    def load(self) -> LoadSnapshot: ...

    def is_ready(self) -> bool:
        """False while starting (SGLang answers 503 to /health then)."""
        ...
