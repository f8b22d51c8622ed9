"""Types shared by the router's library core, its policies and its HTTP layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from kvroute.cache_index.hashing import BlockHash


class WorkerRole(enum.Enum):
    REGULAR = "regular"
    PREFILL = "prefill"
    DECODE = "decode"


class WorkerState(enum.Enum):
    PENDING = "pending"  # registered, not yet healthy (registration runs in the background)
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # failed health checks or circuit open
    DRAINING = "draining"  # takes no new requests; finishes what it has
    REJECTED = "rejected"  # registration refused (e.g. page_size != --block-size); reason kept


@dataclass
class WorkerLoad:
    """Load as the router counts it (routed -> first token -> finished), corrected by /get_load polls.

    Invariant: every field is >= 0; the proxy reserves on select and releases in `finally`.
    """

    in_flight: int = 0  # requests routed and not finished
    pending_prefill_tokens: int = 0  # uncached prompt tokens of requests routed that have no first token yet
    active_blocks: int = 0  # KV blocks held by running requests (prompt + generated so far, in blocks)
    engine_running: int | None = None  # from the engine's /get_load, when polled
    engine_queued: int | None = None
    engine_token_usage: float | None = None  # fraction of KV capacity in use, from the engine
    # This replica's share of pending_prefill_tokens by request priority (router/admission.py: with
    # engine priority scheduling, only prefill of equal or higher priority delays a request).
    pending_prefill_by_priority: dict[int, int] = field(default_factory=dict)
    # When this replica last routed a request here (router clock), and the engine's step time as its
    # streams show it (EWMA of time per output token; None until a stream finished). Together they say
    # whether the prompts in flight here have been admitted to a prefill step yet (`kv_aware`).
    # (Observations, not counters: left out of equality, which tests use for "everything released".)
    last_routed_at: float = field(default=float("-inf"), compare=False)
    step_s: float | None = field(default=None, compare=False)
    # The prefill queue drains while requests wait: the oldest request here without a first token (the
    # head) has `head_tokens` uncached tokens and is taken as started at `head_started_at`;
    # `prefill_tokens_per_s` is the worker's prefill speed learnt from heads' first tokens (None until
    # one came). `kv_aware` subtracts what has drained since from the queued prefill.
    head_tokens: int = field(default=0, compare=False)
    head_started_at: float = field(default=0.0, compare=False)
    prefill_tokens_per_s: float | None = field(default=None, compare=False)
    prefill_sample_tokens: float = field(default=0.0, compare=False, repr=False)
    prefill_sample_s: float = field(default=0.0, compare=False, repr=False)


@dataclass(frozen=True)
class EventSource:
    """One KV-event stream of a worker: a data-parallel rank's publisher (rank 0 alone without DP)."""

    rank: int
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    bind: bool = False  # the engine's PUB connects (SGLang: a concrete endpoint address): the router binds


@dataclass
class Worker:
    """One engine endpoint. Identity is `url`; `slot` is its small integer id in the index."""

    url: str
    role: WorkerRole = WorkerRole.REGULAR
    state: WorkerState = WorkerState.PENDING
    model: str | None = None
    page_size: int | None = None
    bootstrap_port: int | None = None  # PD: prefill servers' bootstrap port
    kv_events_endpoint: str | None = None  # tcp://host:port of the engine's PUB socket
    kv_events_replay_endpoint: str | None = None
    kv_events_topic: str = ""
    kv_events_bind: bool = False  # the router binds the endpoint (the engine's publisher connects to it)
    kv_event_sources: tuple[EventSource, ...] = ()  # every rank's stream (dp_aware; rank 0 alone otherwise)
    dp_size: int = 1  # the engine's data-parallel ranks (SGLang's --dp-size), from /server_info
    dp_rank_field: str = (
        "routed_dp_rank"  # the request field naming a rank (data_parallel_rank before 0.5.10)
    )
    max_total_tokens: int | None = None  # KV capacity in tokens, from /server_info
    load: WorkerLoad = field(default_factory=WorkerLoad)
    reason: str | None = None  # why the worker is unhealthy or rejected

    @property
    def routable(self) -> bool:
        return self.state is WorkerState.HEALTHY


@dataclass(frozen=True)
class RoutingRequest:
    """What a policy sees of a request: its block hashes and sizes, never the body."""

    block_hashes: tuple[BlockHash, ...]
    prompt_tokens: int
    block_size: int
    session_key: str | None = None  # consistent_hash affinity: session header or OpenAI `user`
    text: str | None = None  # prompt text, for the character-level cache_aware policy
    model: str | None = None
    expected_output_tokens: int | None = None  # max_tokens when given, for decode-load estimates


@dataclass(frozen=True)
class WorkerScore:
    """One candidate's cost (finite, lower is better) and what went into it, for explain/logs."""

    url: str
    cost: float
    cached_blocks: int = 0
    terms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """A policy's pick. `ranked` lists every candidate best first, so the proxy retries down the list."""

    worker: str
    ranked: tuple[str, ...]
    policy: str
    cached_blocks: int = 0  # blocks of the prompt the chosen worker is believed to hold
    reason: str = ""
    scores: tuple[WorkerScore, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
