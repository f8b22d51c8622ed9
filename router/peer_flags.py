"""Every long flag of SGLang's routers (`sglang-router` 0.3.2, `smg` 1.13) and what `kvroute serve` does with it.

One table, so that a command line copied from the peers' docs either works with the same meaning or stops
with a one-line reason; nothing is silently ignored, nothing is "unrecognized". Kinds:
- SAME: a kvroute flag of that name and meaning (defined in `kvroute.router.cli`; a default that differs is in the note);
- MAPPED: accepted and translated onto kvroute settings (`kvroute.router.cli.apply_peer_flags`; the note says how);
- INERT: accepted, no effect in kvroute, and a warning at start-up says why (tuning of features kvroute does
  differently, or that the engines do);
- REFUSED: accepted by the parser, then `kvroute serve` exits 2 with the reason and what to use instead.
`tests/router/test_peer_flags.py` checks the table against the peers' recorded flags
(`tests/router/data/peer_flags.json`, from `scripts/record_peer_flags.py`) and the migration table in
`docs/operations.md` against `migration_table()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Support(StrEnum):
    SAME = "same"
    MAPPED = "mapped"
    INERT = "inert"
    REFUSED = "refused"


@dataclass(frozen=True)
class PeerFlag:
    support: Support
    note: str
    arity: str = "1"  # values the flag takes, as the peers parse it: "0" switch, "1", "*" or "+"
    accept: tuple[
        str, ...
    ] = ()  # REFUSED only for values outside this set (empty: refused whatever the value)


SAME, MAPPED, INERT, REFUSED = Support.SAME, Support.MAPPED, Support.INERT, Support.REFUSED

_DISCOVERY = "kvroute discovers workers from Kubernetes pods, DNS or a file (docs/discovery.md); this selector/option of smg's is not offered"
_TENANTS = "kvroute admits by engine load and per-tenant quotas instead of one global limit: --admission, --admission-max-queue, a [tenants.default] table with max_concurrent / tokens_per_s (docs/tenants.md)"
_HISTORY = "kvroute keeps no conversation store: /v1/responses and conversations are forwarded to the engines, which store them"
_MESH = "kvroute replicas share load and membership through Redis instead (--redis-url, docs/replicas.md)"
_GRPC = "kvroute speaks HTTP to SGLang engines; gRPC/ZMQ workers and router-side media processing are not supported"
_MM = "kvroute forwards multimodal requests unchanged; the engines fetch and preprocess media"
_CA_TUNING = "cache_aware tuning of smg's event-driven index; kvroute's kv_aware has its own cost model (docs/routing.md)"
_OVERLOAD = (
    "kvroute has no worker overload shedding: kv_aware's balance guard steers away from loaded workers"
)
_PARSER = "the engines parse reasoning and tool calls (start them with the parser); kvroute forwards responses unchanged"
_TOKCACHE = "kvroute has no tokenizer cache to tune"
_TLS_UP = "kvroute talks plain http:// to engines (no TLS/mTLS upstream)"
_AUTH = "kvroute guards /admin and /workers with one bearer token: use --admin-token"
_PH = "the prefix_hash policy is not offered: use --policy cache_aware or kv_aware"
_LL = "smg's least_load estimator; kvroute's least_load counts pending + active KV blocks (no tuning)"
_RL = "the RL control plane (/v1/rl) is not offered"
_EPD = "encode/prefill/decode disaggregation is not supported (prefill/decode is: --pd-disaggregation)"
_WASM = "WebAssembly plugins are not supported"
_STICKY = "use --policy consistent_hash (affinity on --session-header, or the OpenAI 'user' field)"
_MANUAL = "manual policy tuning; --policy manual runs kvroute's consistent_hash"
_WARM = "smg's warm-up slice for new workers; kvroute routes a new worker on cost and load at once"
_LIVE = "smg's liveness heuristics; kvroute uses the circuit breaker and health checks (--cb-*, --health-*)"

# flag -> what kvroute does with it. Sorted by topic; the test checks it covers both peers exactly.
PEER_FLAGS: dict[str, PeerFlag] = {
    # --- serving
    "--host": PeerFlag(
        SAME, "kvroute binds 127.0.0.1 by default (peers: 0.0.0.0): give --host 0.0.0.0 and --admin-token"
    ),
    "--port": PeerFlag(SAME, "default 30000, as the peers"),
    "--max-payload-size": PeerFlag(SAME, "request body limit in bytes, default 512 MiB as the peers"),
    "--request-timeout-secs": PeerFlag(SAME, "whole upstream request, default 1800 s as the peers"),
    "--request-id-headers": PeerFlag(
        MAPPED,
        "headers checked for the request id, the first present wins; the first one named is the header sent to engines and in responses (default X-Request-Id)",
        "*",
    ),
    "--shutdown-grace-period-secs": PeerFlag(
        SAME, "on SIGTERM in-flight requests and streams get this long to finish, default 180 s as the peers"
    ),
    "--cors-allowed-origins": PeerFlag(
        REFUSED, "kvroute sends no CORS headers: serve browsers through a proxy that adds them", "*"
    ),
    "--health-check-port": PeerFlag(
        SAME, "also serve /health, /liveness and /readiness on this port (default: the main port only)"
    ),
    "--header-read-timeout-secs": PeerFlag(
        SAME, "seconds for a client's request head, 408 past it (kvroute default 10 s; smg 30 s)"
    ),
    "--idle-connection-timeout-secs": PeerFlag(
        SAME, "seconds an idle client keep-alive connection stays open (kvroute default 75 s; smg 90 s)"
    ),
    "--max-buffered-request-bytes": PeerFlag(
        INERT, "kvroute reads every request body whole (up to --max-payload-size) and can always retry it"
    ),
    "--stream-body-stall-timeout-secs": PeerFlag(
        SAME,
        "seconds to receive a request body, 408 past it (kvroute --body-timeout-secs, default 30 s; smg 300 s)",
    ),
    "--sse-keepalive-secs": PeerFlag(
        INERT, "kvroute relays the engine's stream chunk by chunk and adds no keep-alive frames"
    ),
    "--tls-cert-path": PeerFlag(SAME, "serve HTTPS with this PEM certificate (with --tls-key-path)"),
    "--tls-key-path": PeerFlag(SAME, "the PEM private key of --tls-cert-path"),
    # --- workers
    "--worker-urls": PeerFlag(SAME, "more at runtime: POST /workers or /admin/workers", "*"),
    "--api-key": PeerFlag(
        SAME, "sent to the engines as 'Authorization: Bearer' on every call (health, info, loads, generation)"
    ),
    "--dp-aware": PeerFlag(
        SAME,
        "route to a data-parallel rank of each engine (routed_dp_rank), by each rank's own cache and load",
        "0",
    ),
    "--dp-minimum-tokens-scheduler": PeerFlag(
        INERT, "with --dp-aware kvroute picks the rank by its cache and load", "0"
    ),
    "--worker-startup-timeout-secs": PeerFlag(
        SAME,
        "a worker not answering its health endpoint by then is rejected (reason shown), default 1800 s as the peers",
    ),
    "--worker-startup-check-interval": PeerFlag(
        SAME, "seconds between start-up health checks (kvroute default 1 s; peers 30 s)"
    ),
    "--worker-startup-delay": PeerFlag(
        SAME, "seconds before a new worker's first start-up check, default 0 as smg"
    ),
    "--health-check-interval-secs": PeerFlag(
        SAME, "kvroute default 10 s (peers 60 s): a dead engine leaves the pool sooner"
    ),
    "--health-check-timeout-secs": PeerFlag(SAME, "default 5 s as the peers"),
    "--health-check-endpoint": PeerFlag(SAME, "default /health as the peers"),
    "--health-failure-threshold": PeerFlag(SAME, "default 3 as the peers"),
    "--health-success-threshold": PeerFlag(
        SAME, "consecutive good checks that restore an unhealthy worker (kvroute default 1; peers 2)"
    ),
    "--disable-health-check": PeerFlag(SAME, "no periodic health checks", "0"),
    "--load-monitor-interval": PeerFlag(
        MAPPED, "seconds between engine load polls (kvroute --load-poll-interval-secs, default 5; smg 10)"
    ),
    "--disable-load-monitoring": PeerFlag(
        INERT,
        "kvroute polls engine loads for every policy (--load-poll-interval-secs 0 turns polling off)",
        "0",
    ),
    "--remove-unhealthy-workers": PeerFlag(
        INERT, "kvroute keeps unhealthy workers registered and restores them on good health checks", "0"
    ),
    "--no-remove-unhealthy-workers": PeerFlag(
        INERT, "kvroute keeps unhealthy workers registered (the same behaviour)", "0"
    ),
    "--worker-auto-recovery": PeerFlag(
        INERT, "kvroute restores unhealthy workers on good health checks (the same behaviour)", "0"
    ),
    "--no-worker-auto-recovery": PeerFlag(
        INERT, "kvroute always restores unhealthy workers on good health checks", "0"
    ),
    "--upstream-http2": PeerFlag(
        REFUSED, "kvroute speaks HTTP/1.1 with keep-alive to engines (SGLang serves HTTP/1.1)", "0"
    ),
    "--upstream-pool-idle-timeout-secs": PeerFlag(
        INERT, "kvroute's engine connections are reused while alive and replaced on failure"
    ),
    "--client-cert-path": PeerFlag(REFUSED, _TLS_UP),
    "--client-key-path": PeerFlag(REFUSED, _TLS_UP),
    "--ca-cert-paths": PeerFlag(REFUSED, _TLS_UP, "*"),
    "--job-queue-capacity": PeerFlag(INERT, "kvroute registers workers in background tasks, no job queue"),
    "--job-queue-concurrency": PeerFlag(INERT, "kvroute registers workers in background tasks, no job queue"),
    "--backend": PeerFlag(REFUSED, "kvroute routes to SGLang engines only", accept=("sglang",)),
    "--zmq-engine-count": PeerFlag(REFUSED, _GRPC),
    # --- routing policy
    "--policy": PeerFlag(
        SAME,
        "random, round_robin, cache_aware, power_of_two as the peers; consistent_hashing and manual run consistent_hash; also least_load and kv_aware (kvroute's default; peers: cache_aware); in PD mode it sets both pools unless --prefill-policy/--decode-policy name them",
    ),
    "--prefill-policy": PeerFlag(
        SAME, "PD: the prefill pool's policy (default: --policy if given, else kv_aware)"
    ),
    "--decode-policy": PeerFlag(
        SAME, "PD: the decode pool's policy (default: --policy if given, else least_load)"
    ),
    "--cache-threshold": PeerFlag(
        MAPPED, "cache_aware's cache_threshold (matched fraction of the prompt), default 0.3 as the peers"
    ),
    "--cache-match-threshold": PeerFlag(MAPPED, "cache_aware's cache_threshold (smg's newer name)"),
    "--balance-abs-threshold": PeerFlag(
        MAPPED, "cache_aware's balance_abs_threshold (requests in flight), default 64 as the peers"
    ),
    "--spill-abs-threshold": PeerFlag(MAPPED, "cache_aware's balance_abs_threshold (smg's newer name)"),
    "--balance-rel-threshold": PeerFlag(
        MAPPED, "cache_aware's balance_rel_threshold, default 1.5 as the peers"
    ),
    "--spill-rel-threshold": PeerFlag(MAPPED, "cache_aware's balance_rel_threshold (smg's newer name)"),
    "--eviction-interval-secs": PeerFlag(
        MAPPED, "cache_aware's eviction_interval_secs, default 60 as the peers"
    ),
    "--max-tree-size": PeerFlag(
        MAPPED,
        "cache_aware's max_tree_size: the peers count characters, kvroute blocks per worker, converted at 4 characters per token",
    ),
    "--cache-ttl-secs": PeerFlag(MAPPED, "cache_aware's ttl_secs (kvroute default 600 s; smg 180 s)"),
    "--bucket-adjust-interval-secs": PeerFlag(INERT, "the bucket prefill policy is not offered"),
    "--max-idle-secs": PeerFlag(INERT, _MANUAL),
    "--sticky-key-idle-secs": PeerFlag(INERT, _MANUAL),
    "--assignment-mode": PeerFlag(INERT, _MANUAL),
    "--routing-key-headers": PeerFlag(
        MAPPED, "the first header names consistent_hash's session key (kvroute --session-header)", "*"
    ),
    "--routing-key-override": PeerFlag(REFUSED, _STICKY, "0"),
    "--sticky-sessions": PeerFlag(REFUSED, _STICKY, "0"),
    "--prefix-token-count": PeerFlag(INERT, _PH),
    "--prefix-hash-load-factor": PeerFlag(INERT, _PH),
    "--prefix-hash-balance-abs-threshold": PeerFlag(INERT, _PH),
    "--least-load-kv-pressure-weight": PeerFlag(INERT, _LL),
    "--least-load-default-throughput": PeerFlag(INERT, _LL),
    "--least-load-mean-prefill-tokens": PeerFlag(INERT, _LL),
    "--least-load-max-waiting-requests": PeerFlag(INERT, _LL),
    "--power-of-two-load-metric": PeerFlag(
        INERT, "kvroute's power_of_two compares pending + active KV blocks"
    ),
    "--balance-token-usage-threshold": PeerFlag(INERT, _CA_TUNING),
    "--overload-token-usage-threshold": PeerFlag(INERT, _CA_TUNING),
    "--kv-index": PeerFlag(INERT, _CA_TUNING),
    "--cache-index": PeerFlag(INERT, _CA_TUNING),
    "--cache-boundaries": PeerFlag(INERT, _CA_TUNING),
    "--selection-policy": PeerFlag(INERT, _CA_TUNING),
    "--selection-accounting-ttl-ms": PeerFlag(INERT, _CA_TUNING),
    "--selection-temperature": PeerFlag(
        INERT, _CA_TUNING + " (kv_aware's temperature is a policy param, in blocks)"
    ),
    "--overlap-decay": PeerFlag(INERT, _CA_TUNING),
    "--block-size": PeerFlag(
        SAME, "tokens per KV block, = the engines' --page-size (checked at registration), default 16 as smg"
    ),
    "--worker-overload-protection": PeerFlag(INERT, _OVERLOAD, "0"),
    "--disable-worker-overload-protection": PeerFlag(INERT, _OVERLOAD, "0"),
    "--worker-overload-shed": PeerFlag(INERT, _OVERLOAD, "0"),
    "--worker-overload-waiting-requests": PeerFlag(INERT, _OVERLOAD),
    "--worker-overload-token-usage": PeerFlag(INERT, _OVERLOAD),
    "--worker-stall-secs": PeerFlag(INERT, _LIVE),
    "--worker-wedge-secs": PeerFlag(INERT, _LIVE),
    "--worker-stale-secs": PeerFlag(INERT, _LIVE),
    "--worker-warmup-secs": PeerFlag(INERT, _WARM),
    "--worker-warmup-share": PeerFlag(INERT, _WARM),
    "--worker-warmup-blocks": PeerFlag(INERT, _WARM),
    "--worker-warmup-thin-ratio": PeerFlag(INERT, _WARM),
    "--worker-warmup-divert-every": PeerFlag(INERT, _WARM),
    # --- prefill/decode
    "--pd-disaggregation": PeerFlag(
        SAME, "route through (prefill, decode) pairs with SGLang's bootstrap protocol", "0"
    ),
    "--prefill": PeerFlag(
        SAME, "URL [BOOTSTRAP_PORT|none], repeatable; no port: the one /server_info reports", "+"
    ),
    "--decode": PeerFlag(SAME, "URL, repeatable"),
    "--mini-lb": PeerFlag(INERT, "kvroute's PD routing plays MiniLB's part (and more)", "0"),
    "--pd-admission-wait-secs": PeerFlag(REFUSED, _TENANTS),
    "--prefill-max-inflight-requests-per-worker": PeerFlag(REFUSED, _TENANTS),
    "--prefill-queue-size": PeerFlag(REFUSED, _TENANTS),
    "--prefill-queue-timeout-secs": PeerFlag(REFUSED, _TENANTS),
    "--epd-disaggregation": PeerFlag(REFUSED, _EPD, "0"),
    "--encode": PeerFlag(REFUSED, _EPD, "+"),
    "--encode-policy": PeerFlag(REFUSED, _EPD),
    "--encode-selector": PeerFlag(REFUSED, _EPD, "+"),
    "--enable-igw": PeerFlag(
        REFUSED,
        "one model per router: run one kvroute per model (multi-model gateway mode is not offered)",
        "0",
    ),
    # --- retries and circuit breaker
    "--retry-max-retries": PeerFlag(
        MAPPED,
        "total attempts as the peers (kvroute --max-retries counts the extra ones: N-1), default 5 as the peers",
    ),
    "--disable-retries": PeerFlag(SAME, "one attempt only", "0"),
    "--retry-initial-backoff-ms": PeerFlag(
        SAME,
        "pause before the first retry (kvroute default 0 ms: the retry goes to another worker at once; peers 50 ms)",
    ),
    "--retry-max-backoff-ms": PeerFlag(SAME, "longest pause between retries, default 30000 ms as the peers"),
    "--retry-backoff-multiplier": PeerFlag(SAME, "growth of the pause per retry, default 1.5 as the peers"),
    "--retry-jitter-factor": PeerFlag(SAME, "random share (+/-) of each pause, default 0.2 as the peers"),
    "--cb-failure-threshold": PeerFlag(SAME, "consecutive request failures that open a worker's breaker"),
    "--cb-success-threshold": PeerFlag(SAME, "half-open successes that close it"),
    "--cb-timeout-duration-secs": PeerFlag(SAME, "seconds an open breaker waits before a half-open probe"),
    "--cb-window-duration-secs": PeerFlag(
        INERT, "kvroute's breaker counts consecutive failures, without a time window"
    ),
    "--disable-circuit-breaker": PeerFlag(SAME, "no breaker", "0"),
    # --- admission and tenants
    "--max-concurrent-requests": PeerFlag(REFUSED, _TENANTS, accept=("-1", "0")),
    "--queue-size": PeerFlag(REFUSED, _TENANTS, accept=("100",)),
    "--queue-timeout-secs": PeerFlag(REFUSED, _TENANTS, accept=("60",)),
    "--rate-limit-tokens-per-second": PeerFlag(REFUSED, _TENANTS, accept=("0",)),
    "--tenant-api-key": PeerFlag(
        MAPPED,
        "TENANT:KEY, repeatable: that key identifies that tenant (kvroute's [tenants.TENANT] api_keys; replaces a config file's tenants)",
    ),
    "--tenant-header-name": PeerFlag(
        MAPPED, "with --trust-tenant-header: kvroute's --tenant-header (smg's default x-smg-tenant-id)"
    ),
    "--trust-tenant-header": PeerFlag(
        MAPPED,
        "trust a gateway's tenant header: kvroute's --tenant-header (named by --tenant-header-name)",
        "0",
    ),
    "--tenant-rate-limit-config": PeerFlag(REFUSED, _TENANTS),
    "--tenant-rate-limit-enabled": PeerFlag(REFUSED, _TENANTS, "0"),
    "--priority-scheduler-enabled": PeerFlag(REFUSED, _TENANTS, "0"),
    "--priority-scheduler-config": PeerFlag(REFUSED, _TENANTS),
    "--priority-scheduler-default-max-class": PeerFlag(
        INERT, "priority scheduling is not offered (--priority-scheduler-enabled is refused)"
    ),
    "--priority-scheduler-tenant-metric-top-n": PeerFlag(
        INERT, "priority scheduling is not offered (--priority-scheduler-enabled is refused)"
    ),
    # --- control-plane auth
    "--control-plane-api-keys": PeerFlag(REFUSED, _AUTH, "*"),
    "--control-plane-audit-enabled": PeerFlag(
        REFUSED, "admin actions are logged at INFO (no separate audit log)", "0"
    ),
    "--jwt-issuer": PeerFlag(REFUSED, _AUTH),
    "--jwt-audience": PeerFlag(REFUSED, _AUTH),
    "--jwt-jwks-uri": PeerFlag(REFUSED, _AUTH),
    "--jwt-role-mapping": PeerFlag(REFUSED, _AUTH, "*"),
    # --- service discovery
    "--service-discovery": PeerFlag(
        SAME, "discover workers on Kubernetes (docs/discovery.md), as the peers", "0"
    ),
    "--discovery-provider": PeerFlag(SAME, "kubernetes, file (as smg) or dns (kvroute's own)"),
    "--discovery-file": PeerFlag(SAME, "a JSON/YAML worker list, re-read when it changes"),
    "--discovery-check-interval-secs": PeerFlag(
        SAME, "seconds between file re-reads and DNS re-resolves (default 30)"
    ),
    "--selector": PeerFlag(SAME, "Kubernetes label selector of worker pods", "+"),
    "--prefill-selector": PeerFlag(SAME, "PD: label selector of prefill pods", "+"),
    "--decode-selector": PeerFlag(SAME, "PD: label selector of decode pods", "+"),
    "--router-selector": PeerFlag(REFUSED, _DISCOVERY, "+"),
    "--service-discovery-port": PeerFlag(SAME, "engine port of discovered pods"),
    "--service-discovery-namespace": PeerFlag(SAME, "namespace watched (default all)"),
    "--model-id-from": PeerFlag(REFUSED, _DISCOVERY),
    "--kv-connector-annotation": PeerFlag(INERT, "a vLLM pod annotation of smg's discovery"),
    "--kv-engine-id-annotation": PeerFlag(INERT, "a vLLM pod annotation of smg's discovery"),
    # --- logging and metrics
    "--log-dir": PeerFlag(SAME, "also write the log to DIR/kvroute.log (created when missing)"),
    "--log-level": PeerFlag(SAME, "debug, info, warn (= warning), error"),
    "--log-json": PeerFlag(SAME, "one JSON object per log line", "0"),
    "--log-mm-timing": PeerFlag(INERT, _MM, "0"),
    "--prometheus-port": PeerFlag(
        SAME,
        "a separate metrics listener (GET /metrics) on this port; kvroute default: none, /metrics on the main port only (peers: 29000)",
    ),
    "--prometheus-host": PeerFlag(SAME, "address of the metrics listener (default 0.0.0.0 as the peers)"),
    "--prometheus-duration-buckets": PeerFlag(
        INERT, "kvroute's latency histograms have fixed buckets (router/metrics.py)", "+"
    ),
    "--enable-trace": PeerFlag(
        INERT,
        "kvroute traces when --otlp-traces-endpoint is given (and propagates traceparent to the engines either way)",
        "0",
    ),
    "--otlp-traces-endpoint": PeerFlag(
        SAME,
        "the collector, over OTLP/HTTP: give its URL (http://host:4318/v1/traces; the peers take gRPC host:port)",
    ),
    "--jemalloc-prof-dir": PeerFlag(INERT, "a Rust allocator profile; kvroute is Python"),
    # --- tokenizer and parsers
    "--model-path": PeerFlag(
        MAPPED, "the tokenizer kvroute uses to hash prompts (--tokenizer): a local Hugging Face directory"
    ),
    "--model": PeerFlag(
        MAPPED, "the tokenizer kvroute uses to hash prompts (--tokenizer): a local Hugging Face directory"
    ),
    "--tokenizer-path": PeerFlag(
        SAME, "alias of --tokenizer: a local Hugging Face tokenizer directory or tokenizer.json"
    ),
    "--chat-template": PeerFlag(
        INERT, "the engines apply chat templates; kvroute forwards chat requests unchanged"
    ),
    "--disable-tokenizer-autoload": PeerFlag(
        INERT, "kvroute loads a tokenizer only when --tokenizer (or --model-path) is given", "0"
    ),
    "--tokenizer-cache-enable-l0": PeerFlag(INERT, _TOKCACHE, "0"),
    "--tokenizer-cache-l0-max-entries": PeerFlag(INERT, _TOKCACHE),
    "--tokenizer-cache-l0-max-memory": PeerFlag(INERT, _TOKCACHE),
    "--tokenizer-cache-enable-l1": PeerFlag(INERT, _TOKCACHE, "0"),
    "--tokenizer-cache-l1-max-memory": PeerFlag(INERT, _TOKCACHE),
    "--reasoning-parser": PeerFlag(INERT, _PARSER),
    "--tool-call-parser": PeerFlag(INERT, _PARSER),
    "--parser": PeerFlag(INERT, _PARSER),
    "--mcp-config-path": PeerFlag(REFUSED, "MCP tool execution in the router is not offered"),
    "--model-alias": PeerFlag(
        REFUSED, "model aliases are not offered: clients use the engines' served model names"
    ),
    # --- storage (smg's conversation/response history)
    "--history-backend": PeerFlag(REFUSED, _HISTORY, accept=("memory", "none")),
    "--history-memory-max-items": PeerFlag(INERT, _HISTORY),
    "--history-memory-max-responses": PeerFlag(INERT, _HISTORY),
    "--history-memory-retention-secs": PeerFlag(INERT, _HISTORY),
    "--max-background-responses": PeerFlag(
        INERT, "background responses are the engine's (/v1/responses is forwarded)"
    ),
    "--redis-url": PeerFlag(
        MAPPED,
        "different meaning: kvroute shares load and membership between router replicas through this Redis (smg: its conversation store; --history-backend redis is refused)",
    ),
    "--redis-pool-max": PeerFlag(INERT, _HISTORY),
    "--redis-retention-days": PeerFlag(INERT, _HISTORY),
    "--redis-op-timeout-secs": PeerFlag(INERT, _HISTORY),
    "--postgres-db-url": PeerFlag(REFUSED, _HISTORY),
    "--postgres-pool-max": PeerFlag(INERT, _HISTORY),
    "--postgres-op-timeout-secs": PeerFlag(INERT, _HISTORY),
    "--oracle-wallet-path": PeerFlag(REFUSED, _HISTORY),
    "--oracle-tns-alias": PeerFlag(REFUSED, _HISTORY),
    "--oracle-connect-descriptor": PeerFlag(REFUSED, _HISTORY),
    "--oracle-username": PeerFlag(REFUSED, _HISTORY),
    "--oracle-password": PeerFlag(REFUSED, _HISTORY),
    "--oracle-external-auth": PeerFlag(REFUSED, _HISTORY, "0"),
    "--oracle-pool-min": PeerFlag(INERT, _HISTORY),
    "--oracle-pool-max": PeerFlag(INERT, _HISTORY),
    "--oracle-pool-timeout-secs": PeerFlag(INERT, _HISTORY),
    "--schema-config": PeerFlag(REFUSED, _HISTORY),
    "--storage-context-headers": PeerFlag(INERT, _HISTORY, "*"),
    "--storage-hook-wasm-path": PeerFlag(REFUSED, _WASM),
    # --- features kvroute does not offer
    "--enable-mesh": PeerFlag(REFUSED, _MESH, "0"),
    "--mesh-host": PeerFlag(INERT, _MESH),
    "--mesh-port": PeerFlag(INERT, _MESH),
    "--mesh-advertise-host": PeerFlag(INERT, _MESH),
    "--mesh-peer-urls": PeerFlag(REFUSED, _MESH, "*"),
    "--mesh-server-name": PeerFlag(INERT, _MESH),
    "--mesh-tls-ca-cert": PeerFlag(INERT, _MESH),
    "--mesh-tls-cert": PeerFlag(INERT, _MESH),
    "--mesh-tls-key": PeerFlag(INERT, _MESH),
    "--enable-rl": PeerFlag(REFUSED, _RL, "0"),
    "--rl-control-timeout-secs": PeerFlag(INERT, _RL),
    "--rl-fanout-concurrency": PeerFlag(INERT, _RL),
    "--enable-wasm": PeerFlag(REFUSED, _WASM, "0"),
    "--multimodal-tensor-transport": PeerFlag(INERT, _MM),
    "--multimodal-shm-min-bytes": PeerFlag(INERT, _MM),
    "--multimodal-max-inflight-bytes": PeerFlag(INERT, _MM),
    "--mm-per-request-image-limit": PeerFlag(INERT, _MM),
    "--mm-processing": PeerFlag(INERT, _MM),
    "--mm-pixel-cache-mb": PeerFlag(INERT, _MM),
    "--mm-pixel-rdma": PeerFlag(INERT, _MM, "0"),
    "--mm-allowed-media-domains": PeerFlag(INERT, _MM),
    "--mm-allow-private-media-hosts": PeerFlag(INERT, _MM, "0"),
    "--rdma-listen-ip": PeerFlag(INERT, _MM),
    "--rdma-slot-ttl-s": PeerFlag(INERT, _MM),
}

# Policy names of the peers -> kvroute's (the same where both have it).
POLICY_ALIASES: dict[str, str] = {"consistent_hashing": "consistent_hash", "manual": "consistent_hash"}


def refusal(flag: str, values: list[str]) -> str | None:
    """Why `flag` given `values` stops `kvroute serve`; None when it is accepted."""
    spec = PEER_FLAGS.get(flag)
    if spec is None or spec.support is not Support.REFUSED:
        return None
    if spec.accept and all(v in spec.accept for v in values):
        return None
    shown = f"{flag} {' '.join(values)}".strip()
    return f"{shown} is not supported by kvroute: {spec.note}"


def migration_table() -> str:
    """The Markdown table of docs/operations.md (regenerated from this module; the test compares)."""
    order = {Support.SAME: 0, Support.MAPPED: 1, Support.INERT: 2, Support.REFUSED: 3}
    words = {
        Support.SAME: "same",
        Support.MAPPED: "mapped",
        Support.INERT: "accepted, no effect (warns)",
        Support.REFUSED: "refused (exits)",
    }
    lines = ["| peer flag | kvroute | note |", "|---|---|---|"]
    for flag, spec in sorted(PEER_FLAGS.items(), key=lambda kv: (order[kv[1].support], kv[0])):
        what = words[spec.support]
        if spec.support is Support.REFUSED and spec.accept:
            what = f"refused unless {' / '.join(spec.accept)}"
        lines.append(f"| `{flag}` | {what} | {spec.note.replace('|', '/')} |")
    return "\n".join(lines)


BEGIN_MARK = "<!-- peer-flags:begin (generated: python -m kvroute.router.peer_flags) -->"
END_MARK = "<!-- peer-flags:end -->"


def write_docs(path: str) -> None:
    """Replace the generated table between the markers of `path` (docs/operations.md)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, sep, rest = text.partition(BEGIN_MARK)
    _, sep2, tail = rest.partition(END_MARK)
    if not sep or not sep2:
        raise SystemExit(f"{path}: markers {BEGIN_MARK!r} ... {END_MARK!r} not found")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN_MARK}\n{migration_table()}\n{END_MARK}{tail}")


if __name__ == "__main__":  # pragma: no cover
    write_docs("docs/operations.md")
