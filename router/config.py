"""The router's one configuration object, merged from CLI flags > `KVROUTE_*` environment > file > defaults.

Every field says its unit and the value that disables it. Field names are the CLI flag names with
dashes (`max_body_bytes` <-> `--max-body-bytes`) and the environment names upper-cased with the
`KVROUTE_` prefix (`KVROUTE_MAX_BODY_BYTES`). List fields read from the environment are comma-separated.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kvroute.router.peer_flags import POLICY_ALIASES

ENV_PREFIX = "KVROUTE_"
CONFIG_ENV = "KVROUTE_CONFIG"  # the config file's path, when no --config is given
# KVROUTE_* variables that are not settings of the router (read by tests and scripts).
OTHER_ENV = frozenset({"KVROUTE_SGLANG_CACHE", "KVROUTE_STATUS_SCREENSHOT"})
_BOOL_WORDS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class RouterConfig:
    # --- serving
    host: str = "127.0.0.1"  # address to bind; "0.0.0.0" for every interface
    port: int = 30000  # TCP port; 0 picks a free one
    max_body_bytes: int = (
        512 * 1024 * 1024
    )  # request body limit in bytes (413 above it), SGLang's; 0 = no limit
    request_id_header: str = "X-Request-Id"  # propagated to engines and answered, created when absent
    request_id_headers: tuple[str, ...] = ()  # more headers read for a client's request id, in order, after
    # request_id_header (SGLang's --request-id-headers); () = only request_id_header
    shutdown_grace_period_s: float = 180.0  # on SIGTERM, seconds in-flight requests get to finish (SGLang's)
    prometheus_port: int = (
        0  # separate metrics listener (GET /metrics) on this port; 0 = none (main port only)
    )
    prometheus_host: str = "0.0.0.0"  # address of that listener
    health_check_port: int = 0  # also serve /health, /liveness, /readiness on this port; 0 = none
    log_dir: str | None = None  # also log to LOG_DIR/kvroute.log (created when missing); None = stderr only
    log_json: bool = False  # one JSON object per log line
    tls_cert_path: str | None = None  # serve HTTPS with this PEM certificate (with tls_key_path); None = HTTP
    tls_key_path: str | None = None  # its PEM private key
    session_header: str = "X-Session-Id"  # consistent_hash affinity key; the OpenAI `user` field otherwise
    header_timeout_s: float = 10.0  # seconds for a client's request head (from connect or its first byte);
    # 408 and close past it; 0 = no limit
    offload_body_bytes: int = 1024 * 1024  # request bodies this large are parsed, tokenized and hashed on
    # a worker thread, off the event loop (a 30 MB prompt takes ~1 s); 0 = always on the loop
    body_timeout_s: float = 30.0  # seconds to receive a request body after its head (408); 0 = no limit
    keepalive_timeout_s: float = 75.0  # seconds an idle client keep-alive connection stays; 0 = aiohttp's
    max_connections: int = 0  # open client connections; past it new ones get 503 + Retry-After and close.
    # Never above half the descriptor limit (kvroute serve raises the soft limit first); 0 = that half
    no_worker_wait_s: float = 10.0  # seconds a request that finds no routable worker waits while workers
    # register or recover (a restarted router), instead of 503 at once; 0 = answer 503 at once
    processes: int = 1  # serving processes on one port (SO_REUSEPORT), replicas sharing state through
    # Redis (router/supervisor.py); > 1 needs redis_url and a fixed port
    # --- fleet
    worker_urls: tuple[str, ...] = ()  # engines registered at start-up (more via the admin API)
    kv_events: tuple[tuple[str, str], ...] = ()  # (worker url, zmq endpoint) overrides of /server_info;
    # an endpoint prefixed `bind:` / `connect:` says which side binds
    kv_events_socket: str = "auto"  # auto: bind when the engine's publisher connects (SGLang: a concrete
    # endpoint address), else connect | connect | bind: for every discovered stream
    block_size: int = 16  # tokens per KV block; a multiple of every engine's --page-size (checked)
    tokenizer: str | None = None  # local Hugging Face tokenizer dir/file; None = built-in byte tokenizer
    model_seed: str = ""  # namespace of block hashes (model identity); "" = one shared namespace
    engine_api_key: str | None = (
        None  # sent to engines as `Authorization: Bearer` (SGLang's --api-key); None = none
    )
    dp_aware: bool = False  # route to a data-parallel rank of each engine (`routed_dp_rank`), per-rank events
    # --- routing
    policy: str = "kv_aware"  # random | round_robin | least_load | power_of_two | consistent_hash | ...
    policy_params: tuple[tuple[str, str], ...] = ()  # policy parameters as given (k=v), typed by the policy
    cache_aware_params: tuple[tuple[str, str], ...] = ()  # params of every cache_aware policy (main and PD
    # pools), from SGLang's tuning flags (--cache-threshold ...); policy_params win for the main policy
    # --- prefill/decode disaggregation (router/pd.py; flag shapes as SGLang's router)
    pd_disaggregation: bool = False  # route generation through (prefill, decode) pairs
    prefill_urls: tuple[tuple[str, int | None], ...] = ()  # (url, bootstrap port or None = /server_info's)
    decode_urls: tuple[str, ...] = ()  # decode servers registered at start-up
    prefill_policy: str = "kv_aware"  # prefill pool's policy (kv_aware runs with decode_weight=0); when only
    # `policy` is given, that one (as SGLang's router)
    decode_policy: str = "least_load"  # decode pool's policy; when only `policy` is given, that one
    pd_local_prefill_max_tokens: int = 0  # conditional disaggregation: uncached prompts up to this many
    # tokens run on a regular (--worker-urls) worker alone; 0 = always disaggregate
    # --- upstream timeouts and retries
    connect_timeout_s: float = 5.0  # seconds to open a connection to an engine; 0 = no limit
    request_timeout_s: float = 1800.0  # seconds for a whole upstream request (SGLang's); 0 = no limit
    stream_idle_timeout_s: float = 120.0  # seconds between two chunks of a stream (and for its head and first
    # token, so it covers queueing in an overloaded engine); a non-streamed answer's head may take up to
    # request_timeout_s; a wedged engine is caught sooner by stall_timeout_s; 0 = no limit
    stall_timeout_s: float = 20.0  # a worker with requests in flight and no byte from it for this long is
    # probed with /health_generate and, if that fails, taken out of routing (its unanswered requests are
    # retried elsewhere); 0 = off
    max_retries: int = 2  # extra workers tried before anything reached the client; 0 = no retry
    # (SGLang's --retry-max-retries N counts all attempts: max_retries = N - 1)
    retry_initial_backoff_ms: float = 0.0  # pause before the first retry; 0 = retry at once (another worker)
    retry_max_backoff_ms: float = 30000.0  # longest pause between two attempts
    retry_backoff_multiplier: float = 1.5  # pause growth per retry (>= 1)
    retry_jitter_factor: float = 0.2  # each pause varies by up to +/- this share (0..1); 0 = exact
    # --- registry
    control_timeout_s: float = 5.0  # seconds for health/info/load calls; 0 = no limit
    health_check_interval_s: float = 10.0  # seconds between health checks per worker; 0 = disabled
    health_failure_threshold: int = 3  # consecutive failed checks that mark a worker unhealthy
    health_success_threshold: int = 1  # consecutive good checks that restore an unhealthy worker (>= 1)
    health_check_timeout_s: float = 5.0  # seconds for one health check; 0 = no limit
    health_check_endpoint: str = "/health"  # the engines' health path (SGLang: /health or /health_generate)
    registration_retry_s: float = 1.0  # seconds between /health tries while a worker registers
    worker_startup_timeout_s: float = 1800.0  # a registering worker not healthy by then is rejected; 0 = wait
    worker_startup_delay_s: float = 0.0  # seconds before a new worker's first health check
    circuit_failure_threshold: int = 5  # consecutive request failures that open the breaker; 0 = no breaker
    circuit_cooldown_s: float = 30.0  # seconds an open breaker waits before a half-open probe
    circuit_success_threshold: int = 2  # successes in half-open that close the breaker
    circuit_half_open_probes: int = 1  # requests a half-open breaker admits at once (>= 1)
    circuit_max_ejection_percent: float = 50.0  # most of the fleet breakers may hold open, in %; 100 = no cap
    circuit_min_in_rotation: int = 1  # routable workers a breaker never takes the fleet below; 0 = none
    load_poll_interval_s: float = 5.0  # seconds between /get_load polls per worker; 0 = disabled
    blind_check_interval_s: float = 30.0  # seconds between checks for workers serving with no events; 0 = off
    # --- replicas sharing load and membership through Redis (router/shared, docs/replicas.md)
    redis_url: str | None = None  # redis://host:port/db; None = no sharing (single replica)
    replica_id: str = ""  # this replica's name in Redis; "" = host-pid-random
    sync_interval_s: float = 0.2  # seconds between load syncs (one Redis round trip each); must be > 0
    replica_ttl_s: float = 2.0  # seconds a silent replica's load still counts; must exceed sync_interval_s
    redis_key_prefix: str = "kvroute"  # namespace of every Redis key and channel (one per fleet)
    redis_share_records: bool = False  # share cache_aware's routing records through a capped stream
    redis_share_inflight: bool = True  # publish routed prompts so the others predict bursts (kv_aware)
    redis_inflight_ttl_s: float = 10.0  # seconds another replica's routed prompt counts as in flight
    # --- observability (router/observability, docs/observability.md)
    access_log: str | None = None  # JSON-lines access log, one line per request; "-" = stdout; None = off
    recent_requests: int = 1000  # requests kept for /admin/requests/recent and /admin/status; 0 = off
    otlp_traces_endpoint: str | None = None  # OTLP/HTTP traces URL (http://host:4318/v1/traces); None = off
    trace_sample_ratio: float = 1.0  # fraction of requests traced when tracing is on (a client's sampled
    # traceparent is always followed)
    # --- tenants, SLA classes and admission control (router/tenants, router/admission.py, docs/tenants.md)
    tenants: Mapping[str, Any] = field(default_factory=dict)  # [tenants.NAME] tables; {} = no tenants
    classes: Mapping[str, Any] = field(default_factory=dict)  # [classes.NAME] tables: override/add classes
    tenant_header: str | None = None  # header naming the tenant, set by a trusted gateway; None = keys only
    require_api_key: bool = False  # 401 for a request no tenant matches (else it is tenant `default`)
    admission: bool = False  # admission control with no tenants configured too (always on with tenants)
    admission_prefill_tokens_per_s: float = 35000.0  # one engine's prefill rate, tokens/s (queue -> wait)
    admission_max_queued_prefill_tokens: int = 32768  # prefill queued ahead on a worker; 0 = no bound
    admission_max_queue: int = 4096  # requests waiting in the router queue; 429 past it; 0 = never queue
    engine_priority: bool = True  # forward the class priority as SGLang's `priority` (higher first)
    tenant_metrics_limit: int = 20  # tenants with their own metric label; the rest are `other`
    quota_redis_timeout_s: float = 0.1  # longest wait on Redis for a quota check (then per-process)
    # --- autoscaling of the PD pools (router/autoscale, docs/autoscale.md) and cost reports
    autoscale: bool = False  # run the autoscaler loop (PD mode); off by default
    autoscale_scaler: str = "sim"  # sim (in-process simulated engines) | command | kubernetes
    autoscale_interval_s: float = 10.0  # seconds between decisions; must be > 0
    autoscale_window_s: float = 30.0  # seconds of traffic each decision reads; must be > 0
    autoscale_up_window_s: float = 10.0  # a shorter look at the arrival rate for growth; 0 = window only
    autoscale_min_prefill: int = 1  # prefill workers kept at least
    autoscale_max_prefill: int = 8  # prefill workers at most
    autoscale_min_decode: int = 1
    autoscale_max_decode: int = 8
    autoscale_up_cooldown_s: float = 30.0  # seconds after a pool changed before it grows again; 0 = none
    autoscale_down_cooldown_s: float = 120.0  # seconds after a pool changed before it shrinks; 0 = none
    autoscale_hysteresis: float = 0.2  # shrink only if the plan for rate x (1 + this) needs fewer; 0 = none
    autoscale_down_intervals: int = 3  # decisions in a row that must want fewer before one worker goes
    autoscale_max_step_down: int = 1  # workers one decision removes from a pool at most (>= 1)
    autoscale_profile: str = "h100-llama3-8b"  # GPU cost profile the planner models the engines with
    autoscale_max_utilization: float = 0.8  # prefill utilisation planned for, (0, 1)
    autoscale_ttft_attainment: float = 0.95  # share of requests (of those that can) sized to meet slo_ttft_s
    autoscale_shrink_min_samples: int = 200  # prompt samples the planner needs before a pool may shrink
    autoscale_command: str | None = None  # scaler=command: the hook (JSON on stdin; docs/autoscale.md)
    autoscale_command_timeout_s: float = 60.0  # seconds the hook may run before it is killed (a failure)
    autoscale_k8s_namespace: str = "default"  # scaler=kubernetes: the Deployments' namespace
    autoscale_k8s_prefill_deployment: str = ""  # scaler=kubernetes: Deployment of the prefill engines
    autoscale_k8s_decode_deployment: str = ""  # scaler=kubernetes: Deployment of the decode engines
    autoscale_sim_startup_s: float = 0.0  # scaler=sim: seconds a new engine answers 503 (model load)
    autoscale_sim_time_scale: float = 1.0  # scaler=sim: wall seconds per engine second (the planner reads
    # the measurements in engine time); intervals, windows and cooldowns stay wall seconds
    slo_ttft_s: float = 1.0  # TTFT target (s): planner target and the "within SLA" test of cost reports
    slo_itl_s: float = 0.05  # mean inter-token latency target (s), likewise
    gpu_hour_cost: float = 0.0  # price of one GPU-hour for cost reports; 0 = unknown (GPU-seconds only)
    gpus_per_prefill_worker: int = 1  # GPUs one prefill engine holds (its TP x DP)
    gpus_per_decode_worker: int = 1  # GPUs one decode engine holds
    gpus_per_worker: int = 1  # GPUs one regular (aggregated) engine holds
    # --- discovery (router/discovery/, docs/discovery.md; flag names as sglang-router's and smg's)
    discovery_provider: str | None = None  # kubernetes | dns | file; None = --worker-urls and admin only
    service_discovery: bool = False  # sglang-router's switch: the same as discovery_provider "kubernetes"
    selector: str = ""  # Kubernetes label selector of regular workers ("app=sglang,tier=gpu"); "" = none
    prefill_selector: str = ""  # label selector of prefill pods; "" = none
    decode_selector: str = ""  # label selector of decode pods; "" = none
    service_discovery_port: int = 80  # engine port on discovered pods (sglang-router's default)
    service_discovery_namespace: str | None = None  # namespace watched; None = all (needs a ClusterRole)
    bootstrap_port_annotation: str = "sglang.ai/bootstrap-port"  # prefill pods' bootstrap port
    discovery_file: str | None = None  # JSON/YAML worker list the operator's tooling writes (file provider)
    discovery_check_interval_s: float = 30.0  # seconds between file re-reads / DNS re-resolves; > 0
    discovery_dns_name: str | None = None  # DNS name of regular workers (a headless service)
    discovery_dns_prefill_name: str | None = None  # DNS name of prefill workers
    discovery_dns_decode_name: str | None = None  # DNS name of decode workers
    discovery_dns_record: str = "A"  # A (A and AAAA, port = service_discovery_port) | SRV (port from SRV)
    discovery_dns_server: str | None = None  # nameserver HOST[:PORT]; None = the system's resolv.conf
    discovery_dns_grace_s: float = 30.0  # seconds a name that stops resolving keeps its workers; 0 = none
    # --- admin
    admin_token: str | None = None  # bearer token for /admin/*; None = admin from loopback clients only
    log_level: str = "info"  # debug | info | warning | error

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port out of range: {self.port}")
        for name in (
            "max_body_bytes",
            "max_connections",
            "offload_body_bytes",
            "max_retries",
            "prometheus_port",
            "health_check_port",
            "retry_initial_backoff_ms",
            "retry_max_backoff_ms",
            "pd_local_prefill_max_tokens",
            "health_failure_threshold",
            "circuit_failure_threshold",
            "circuit_success_threshold",
            "circuit_min_in_rotation",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        for f in fields(self):
            if f.name.endswith("_s") and getattr(self, f.name) < 0:
                raise ConfigError(f"{f.name} must be >= 0 seconds")
        if (self.prefill_urls or self.decode_urls) and not self.pd_disaggregation:
            raise ConfigError("prefill/decode workers given without pd_disaggregation (--pd-disaggregation)")
        for _, port in self.prefill_urls:
            if port is not None and not 0 < port < 65536:
                raise ConfigError(f"prefill bootstrap port out of range: {port}")
        if self.circuit_half_open_probes < 1:
            raise ConfigError("circuit_half_open_probes must be >= 1")
        if not 0 <= self.circuit_max_ejection_percent <= 100:
            raise ConfigError("circuit_max_ejection_percent must be in [0, 100]")
        if self.recent_requests < 0:
            raise ConfigError(f"recent_requests must be >= 0, got {self.recent_requests}")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ConfigError(f"trace_sample_ratio must be in [0, 1], got {self.trace_sample_ratio}")
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ConfigError("tls_cert_path and tls_key_path go together (--tls-cert-path, --tls-key-path)")
        if self.kv_events_socket not in ("auto", "connect", "bind"):
            raise ConfigError(
                f"kv_events_socket must be auto, connect or bind, got {self.kv_events_socket!r}"
            )
        if self.health_success_threshold < 1:
            raise ConfigError(f"health_success_threshold must be >= 1, got {self.health_success_threshold}")
        if self.retry_backoff_multiplier < 1:
            raise ConfigError(f"retry_backoff_multiplier must be >= 1, got {self.retry_backoff_multiplier}")
        if not 0 <= self.retry_jitter_factor <= 1:
            raise ConfigError(f"retry_jitter_factor must be in [0, 1], got {self.retry_jitter_factor}")
        if not self.health_check_endpoint.startswith("/"):
            raise ConfigError(
                f"health_check_endpoint must be a path starting with /: {self.health_check_endpoint!r}"
            )
        for name in ("prometheus_port", "health_check_port"):
            if getattr(self, name) > 65535:
                raise ConfigError(f"{name} out of range: {getattr(self, name)}")
        if self.processes < 1:
            raise ConfigError(f"processes must be >= 1, got {self.processes}")
        if self.processes > 1 and self.redis_url is None:
            raise ConfigError(
                "processes > 1 needs redis_url (--redis-url): the processes are replicas that share "
                "load, admin changes and the policy through Redis"
            )
        if self.processes > 1 and self.port == 0:
            raise ConfigError("processes > 1 needs a fixed port (port 0 would give each process its own)")
        if self.sync_interval_s <= 0:
            raise ConfigError(f"sync_interval_s must be > 0, got {self.sync_interval_s}")
        if self.replica_ttl_s <= self.sync_interval_s:
            raise ConfigError(
                f"replica_ttl_s ({self.replica_ttl_s}) must exceed sync_interval_s ({self.sync_interval_s})"
            )
        if not self.redis_key_prefix:
            raise ConfigError("redis_key_prefix must not be empty")
        if self.admission_prefill_tokens_per_s <= 0:
            raise ConfigError("admission_prefill_tokens_per_s must be > 0")
        for name in ("admission_max_queued_prefill_tokens", "admission_max_queue", "tenant_metrics_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        self.tenant_table()  # a bad tenant or class fails at start, with the offending table named
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"redis_url must start with redis://, rediss:// or unix://: {self.redis_url!r}")
        _check_autoscale(self)
        self._check_discovery()
        for url in (*self.worker_urls, *(u for u, _ in self.prefill_urls), *self.decode_urls):
            if not url.startswith("http://"):
                raise ConfigError(
                    f"worker url must start with http:// (https to engines is not supported): {url!r}"
                )

    @property
    def discovery(self) -> str | None:
        """The discovery provider in use (`--service-discovery` is sglang-router's `kubernetes`)."""
        return self.discovery_provider or ("kubernetes" if self.service_discovery else None)

    def _check_discovery(self) -> None:
        provider = self.discovery
        if provider not in (None, "kubernetes", "dns", "file"):
            raise ConfigError(f"discovery_provider must be kubernetes, dns or file, got {provider!r}")
        if self.service_discovery and self.discovery_provider not in (None, "kubernetes"):
            raise ConfigError(
                "--service-discovery is the kubernetes provider; give it or --discovery-provider"
            )
        if provider == "kubernetes" and not (self.selector or self.prefill_selector or self.decode_selector):
            raise ConfigError(
                "Kubernetes discovery needs --selector (or --prefill-selector / --decode-selector)"
            )
        if (self.prefill_selector or self.decode_selector) and not self.pd_disaggregation:
            raise ConfigError("--prefill-selector / --decode-selector need --pd-disaggregation")
        if provider == "file" and not self.discovery_file:
            raise ConfigError("the file discovery provider needs --discovery-file")
        names = (self.discovery_dns_name, self.discovery_dns_prefill_name, self.discovery_dns_decode_name)
        if provider == "dns" and not any(names):
            raise ConfigError("DNS discovery needs --discovery-dns-name (or its -prefill / -decode names)")
        if (self.discovery_dns_prefill_name or self.discovery_dns_decode_name) and not self.pd_disaggregation:
            raise ConfigError("prefill/decode DNS names need --pd-disaggregation")
        if self.discovery_dns_record not in ("A", "SRV"):
            raise ConfigError(f"discovery_dns_record must be A or SRV, got {self.discovery_dns_record!r}")
        if not 0 < self.service_discovery_port < 65536:
            raise ConfigError(f"service_discovery_port out of range: {self.service_discovery_port}")
        if self.discovery_check_interval_s <= 0:
            raise ConfigError("discovery_check_interval_s must be > 0")

    @property
    def policy_params_dict(self) -> dict[str, Any]:
        """Params typed for the policy: each value read as JSON (`0.5`, `true`, `null`), else a string."""
        out: dict[str, Any] = {}
        for k, v in self.policy_params:
            try:
                out[k] = json.loads(v)
            except ValueError:
                out[k] = v
        return out

    @property
    def admission_enabled(self) -> bool:
        return self.admission or bool(self.tenants)

    def tenant_table(self) -> Any:
        """The `TenantTable` of `tenants` and `classes`; ConfigError naming what is wrong."""
        from kvroute.router.tenants.classes import TenantConfigError
        from kvroute.router.tenants.table import TenantTable

        try:
            return TenantTable.from_config(self.tenants, self.classes)
        except TenantConfigError as exc:
            raise ConfigError(f"tenants/classes config: {exc}") from exc

    @property
    def kv_events_dict(self) -> dict[str, str]:
        return {normalize_url(u): e for u, e in self.kv_events}


def _check_autoscale(c: RouterConfig) -> None:
    """The autoscaling and cost fields' bounds (router/autoscale)."""
    for name in ("autoscale_interval_s", "autoscale_window_s", "slo_ttft_s", "slo_itl_s"):
        if getattr(c, name) <= 0:
            raise ConfigError(f"{name} must be > 0")
    for pool in ("prefill", "decode"):
        lo, hi = getattr(c, f"autoscale_min_{pool}"), getattr(c, f"autoscale_max_{pool}")
        if lo < 0 or hi < max(lo, 1):
            raise ConfigError(f"autoscale {pool}: need 0 <= min ({lo}) <= max ({hi}) and max >= 1")
    for name in ("gpus_per_prefill_worker", "gpus_per_decode_worker", "gpus_per_worker"):
        if getattr(c, name) < 1:
            raise ConfigError(f"{name} must be >= 1")
    if c.gpu_hour_cost < 0 or c.autoscale_hysteresis < 0:
        raise ConfigError("gpu_hour_cost and autoscale_hysteresis must be >= 0")
    if c.autoscale_down_intervals < 1 or c.autoscale_max_step_down < 1:
        raise ConfigError("autoscale_down_intervals and autoscale_max_step_down must be >= 1")
    if not 0.0 < c.autoscale_max_utilization < 1.0:
        raise ConfigError("autoscale_max_utilization must be in (0, 1)")
    if c.autoscale_shrink_min_samples < 0:
        raise ConfigError("autoscale_shrink_min_samples must be >= 0")
    if not 0.0 < c.autoscale_ttft_attainment < 1.0:
        raise ConfigError("autoscale_ttft_attainment must be in (0, 1)")
    if c.autoscale_scaler not in ("sim", "command", "kubernetes"):
        raise ConfigError(f"autoscale_scaler must be sim, command or kubernetes, not {c.autoscale_scaler!r}")
    if not c.autoscale:
        return
    if not c.pd_disaggregation:
        raise ConfigError("autoscale scales prefill and decode pools: it needs --pd-disaggregation")
    if c.autoscale_scaler == "command" and not c.autoscale_command:
        raise ConfigError("autoscale_scaler=command needs --autoscale-command")
    if c.autoscale_scaler == "kubernetes" and not (
        c.autoscale_k8s_prefill_deployment and c.autoscale_k8s_decode_deployment
    ):
        raise ConfigError(
            "autoscale_scaler=kubernetes needs --autoscale-k8s-prefill-deployment and "
            "--autoscale-k8s-decode-deployment"
        )


def normalize_url(url: str) -> str:
    return url.strip().rstrip("/")


def parse_pairs(items: Any, what: str) -> tuple[tuple[str, str], ...]:
    """`k=v` strings (or a mapping) -> tuple of pairs; the first `=` splits (URLs contain none before it)."""
    if items is None:
        return ()
    if isinstance(items, Mapping):
        return tuple((str(k), _scalar_str(v)) for k, v in items.items())
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    out = []
    for item in items:
        if isinstance(item, list | tuple) and len(item) == 2:
            out.append((str(item[0]), str(item[1])))
            continue
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what}: expected KEY=VALUE, got {item!r}")
        out.append((key.strip(), value.strip()))
    return tuple(out)


def parse_kv_events(items: Any) -> tuple[tuple[str, str], ...]:
    """`URL=ENDPOINT` items; split at the `=` that precedes the zmq scheme (URLs may contain `=`)."""
    if items is None:
        return ()
    if isinstance(items, Mapping):
        return tuple((normalize_url(str(k)), str(v)) for k, v in items.items())
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    out = []
    for item in items:
        s = str(item)
        cut = max(
            s.rfind(f"={mode}{scheme}")
            for mode in ("", "bind:", "connect:")
            for scheme in ("tcp://", "ipc://", "inproc://")
        )
        if cut <= 0:
            raise ConfigError(f"kv_events: expected WORKER_URL=[bind:|connect:]tcp://HOST:PORT, got {s!r}")
        out.append((normalize_url(s[:cut]), s[cut + 1 :]))
    return tuple(out)


def parse_prefill(items: Any) -> tuple[tuple[str, int | None], ...]:
    """Prefill servers with their bootstrap ports, as SGLang's router takes them: each item is a URL,
    optionally followed by a port or `none` (`["http://p:30001", "9001"]`, `"http://p:30001 9001"`,
    `{"url": ..., "bootstrap_port": ...}`). The environment gives them comma-separated."""
    if items is None:
        return ()
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    out: list[tuple[str, int | None]] = []
    for item in items:
        parts: list[Any]
        if isinstance(item, Mapping):
            parts = [item.get("url"), item.get("bootstrap_port")]
        elif isinstance(item, str):
            parts = item.split()
        elif isinstance(item, list | tuple):
            parts = list(item)
        else:
            raise ConfigError(f"prefill: expected 'URL [BOOTSTRAP_PORT|none]', got {item!r}")
        if not parts or not isinstance(parts[0], str) or len(parts) > 2:
            raise ConfigError(f"prefill: expected 'URL [BOOTSTRAP_PORT|none]', got {item!r}")
        port_raw = parts[1] if len(parts) == 2 else None
        port: int | None
        if port_raw is None or (isinstance(port_raw, str) and port_raw.strip().lower() in ("none", "")):
            port = None
        else:
            try:
                if isinstance(port_raw, bool):
                    raise ValueError
                port = int(port_raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"prefill {parts[0]}: bootstrap port must be an integer or 'none'") from exc
        out.append((normalize_url(parts[0]), port))
    return tuple(out)


def parse_selector(raw: Any, what: str) -> str:
    """A Kubernetes label selector as the API takes it (`app=sglang,role=prefill`), from sglang-router's
    `--selector app=sglang role=prefill` items, one string (set-based forms pass through) or a mapping."""
    if raw is None:
        return ""
    if isinstance(raw, Mapping):
        return ",".join(f"{k}={_scalar_str(v)}" for k, v in raw.items())
    if isinstance(raw, str):
        return raw.strip()
    if isinstance(raw, list | tuple):
        return ",".join(str(item).strip() for item in raw if str(item).strip())
    raise ConfigError(f"{what}: expected 'key=value ...', got {raw!r}")


def _name_list(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = raw.replace(",", " ").split()
    return tuple(str(h).strip() for h in raw if str(h).strip())


def _url_list(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [s for s in raw.replace(",", " ").split() if s]
    return tuple(normalize_url(str(u)) for u in raw)


def _tables(name: str, raw: Any) -> dict[str, Any]:
    """`[tenants.NAME]`/`[classes.NAME]` tables from a file, or JSON from the environment/CLI."""
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: expected a JSON object of tables, got {raw[:80]!r}") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a table of tables ([{name}.NAME]), got {type(raw).__name__}")
    return dict(raw)


def _scalar_str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _coerce(name: str, raw: Any) -> Any:
    """Convert a file/env/CLI value to the field's type (the dataclass annotations are strings)."""
    f = {f.name: f for f in fields(RouterConfig)}.get(name)
    if f is None:
        raise ConfigError(f"unknown configuration key: {name!r}{_did_you_mean(name)}")
    t = str(f.type)
    if name in ("worker_urls", "decode_urls"):
        return _url_list(raw)
    if name == "prefill_urls":
        return parse_prefill(raw)
    if name == "kv_events":
        return parse_kv_events(raw)
    if name in ("policy_params", "cache_aware_params"):
        return parse_pairs(raw, name)
    if name == "request_id_headers":
        return _name_list(raw)
    if name in ("policy", "prefill_policy", "decode_policy") and isinstance(raw, str):
        return POLICY_ALIASES.get(raw, raw)
    if name in ("tenants", "classes"):
        return _tables(name, raw)
    if name in ("selector", "prefill_selector", "decode_selector"):
        return parse_selector(raw, name)
    if raw is None:
        if "None" in t:
            return None
        raise ConfigError(f"{name} may not be empty")
    if t == "bool":
        word = raw.strip().lower() if isinstance(raw, str) else raw
        if isinstance(raw, bool) or word in _BOOL_WORDS:
            return raw if isinstance(raw, bool) else _BOOL_WORDS[word]
        raise ConfigError(f"{name}: expected a boolean, got {raw!r}")
    try:
        if t.startswith("int"):
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if t.startswith("float"):
            return float(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: expected {t.split(' ')[0]}, got {raw!r}") from exc
    if "None" in t and isinstance(raw, str) and raw == "":
        return None
    return str(raw)


def load_file(path: str | Path) -> dict[str, Any]:
    """TOML, YAML or JSON by extension; keys are field names (dashes allowed); a `[kvroute]` table unwraps."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text.decode())
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise ConfigError("YAML config needs PyYAML (pip install pyyaml), or use TOML/JSON") from exc
            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file must be .toml, .yaml/.yml or .json: {p}")
    except ConfigError:
        raise
    except Exception as exc:  # each parser has its own error type; report them the same way
        raise ConfigError(f"cannot parse config file {p}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table/object")
    if isinstance(data.get("kvroute"), dict):
        data = data["kvroute"]
    return {k.replace("-", "_"): v for k, v in data.items()}


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from `KVROUTE_<FIELD>` variables, plus `config` from `KVROUTE_CONFIG`; others are left
    to `unknown_env` (a misspelt variable must be reported, not silently ignored)."""
    names = {f.name for f in fields(RouterConfig)} | {"config"}
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in names:
                out[name] = value
    return out


def unknown_env(environ: Mapping[str, str]) -> list[str]:
    """One message per `KVROUTE_*` variable that names no setting (logged as a warning at start: the
    environment is shared with other tools, so it warns where a misspelt file key is an error)."""
    names = {f.name for f in fields(RouterConfig)} | {"config"}
    out = []
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX) or key in OTHER_ENV:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in names:
            close = _closest_field(name)
            hint = f" (did you mean {ENV_PREFIX}{close.upper()}?)" if close else ""
            out.append(f"unknown environment variable {key} ignored{hint}")
    return out


def _closest_field(name: str) -> str | None:
    close = difflib.get_close_matches(name, [f.name for f in fields(RouterConfig)], n=1, cutoff=0.75)
    return close[0] if close else None


def _did_you_mean(name: str) -> str:
    close = _closest_field(name)
    return f" (did you mean {close!r}?)" if close else ""


def build_config(
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> RouterConfig:
    """Merge the sources: CLI > environment > file > defaults. CLI values of None mean 'not given'."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    env = from_env(os.environ if environ is None else environ)
    cli_path, env_path = cli.pop("config", None), env.pop("config", None)  # KVROUTE_CONFIG
    path = config_file or cli_path or env_path
    merged: dict[str, Any] = load_file(path) if path else {}
    merged.update(env)
    merged.update(cli)
    if "policy" in merged:  # SGLang's router: --policy sets both PD pools unless they are named
        for pool in ("prefill_policy", "decode_policy"):
            merged.setdefault(pool, merged["policy"])
    values = {k: _coerce(k, v) for k, v in merged.items()}
    return RouterConfig(**values)


def replace(config: RouterConfig, **changes: Any) -> RouterConfig:
    return dataclasses.replace(config, **changes)
