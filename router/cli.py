"""The `kvroute` command: a dispatch table of subcommands (`serve`, `sim`, `demo`, `bench`, `plan`, `engine`).

`serve` flag names follow SGLang's router (`--worker-urls`, `--policy`, `--host`, `--port`, and its
`--max-payload-size`, `--request-timeout-secs`, `--retry-max-retries`, `--cb-*`, `--health-*` as
aliases), so replacing `python -m sglang_router.launch_router` is a change of command name.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kvroute.router._version import __version__
from kvroute.router.autoscale.flags import add_flags as add_autoscale_flags
from kvroute.router.autoscale.flags import from_args as autoscale_flags
from kvroute.router.config import ConfigError, RouterConfig, build_config, replace, unknown_env

log = logging.getLogger("kvroute")

# (flags, config field, type, help). Every default is None: unset flags fall through to env/file/defaults.
_SERVE_FLAGS: list[tuple[tuple[str, ...], str, Any, str]] = [
    (("--host",), "host", str, "address to bind (default 127.0.0.1; SGLang's router: 0.0.0.0)"),
    (("--port",), "port", int, "port to bind (default 30000; 0 = any free port)"),
    (
        ("--policy",),
        "policy",
        str,
        "routing policy (default kv_aware; SGLang's: cache_aware); in PD mode both pools' unless named",
    ),
    (
        ("--processes",),
        "processes",
        int,
        "serving processes on the port (SO_REUSEPORT), sharing state through --redis-url (default 1)",
    ),
    (
        ("--block-size",),
        "block_size",
        int,
        "tokens per KV block, a multiple of every engine's --page-size (default 16)",
    ),
    (
        ("--tokenizer", "--tokenizer-path"),
        "tokenizer",
        str,
        "local Hugging Face tokenizer dir or tokenizer.json",
    ),
    (("--model-seed",), "model_seed", str, "block-hash namespace (model identity); default shared"),
    (("--admin-token",), "admin_token", str, "bearer token for /admin/* (env KVROUTE_ADMIN_TOKEN)"),
    (
        ("--api-key", "--engine-api-key"),
        "engine_api_key",
        str,
        "key the engines were started with (--api-key): sent as 'Authorization: Bearer' on every engine call",
    ),
    (("--session-header",), "session_header", str, "consistent_hash's session key header (X-Session-Id)"),
    (
        ("--max-body-bytes", "--max-payload-size"),
        "max_body_bytes",
        int,
        "request body limit in bytes (default 512 MiB as SGLang's; 0 = none)",
    ),
    (("--connect-timeout-secs",), "connect_timeout_s", float, "seconds to connect to an engine (0 = none)"),
    (
        ("--request-timeout-secs",),
        "request_timeout_s",
        float,
        "seconds per upstream request (default 1800; 0 = none)",
    ),
    (("--stream-idle-timeout-secs",), "stream_idle_timeout_s", float, "seconds between chunks (0 = none)"),
    (
        ("--stall-timeout-secs",),
        "stall_timeout_s",
        float,
        "seconds a worker with requests in flight may send nothing before a /health_generate probe (0 = off)",
    ),
    (
        ("--header-timeout-secs", "--header-read-timeout-secs"),
        "header_timeout_s",
        float,
        "seconds for a client's request head (408 past it; 0 = none)",
    ),
    (
        ("--body-timeout-secs", "--stream-body-stall-timeout-secs"),
        "body_timeout_s",
        float,
        "seconds for a client's request body (0 = none)",
    ),
    (
        ("--offload-body-bytes",),
        "offload_body_bytes",
        int,
        "bodies this large are parsed and hashed off the event loop (default 1 MiB; 0 = never)",
    ),
    (
        ("--keepalive-timeout-secs", "--idle-connection-timeout-secs"),
        "keepalive_timeout_s",
        float,
        "seconds an idle client connection stays open (default 75)",
    ),
    (
        ("--max-connections",),
        "max_connections",
        int,
        "open client connections (503 past it); at most half the descriptor limit (0 = that half)",
    ),
    (
        ("--no-worker-wait-secs",),
        "no_worker_wait_s",
        float,
        "seconds a request waits for a registering worker instead of 503 (0 = none)",
    ),
    (
        ("--max-retries",),
        "max_retries",
        int,
        "other workers tried after the first attempt (default 2; 0 = none; SGLang's --retry-max-retries N "
        "counts all attempts: N-1)",
    ),
    (
        ("--retry-initial-backoff-ms",),
        "retry_initial_backoff_ms",
        float,
        "pause before the first retry (default 0: at once, on another worker; SGLang's 50)",
    ),
    (("--retry-max-backoff-ms",), "retry_max_backoff_ms", float, "longest pause between retries (30000)"),
    (("--retry-backoff-multiplier",), "retry_backoff_multiplier", float, "pause growth per retry (1.5)"),
    (("--retry-jitter-factor",), "retry_jitter_factor", float, "random +/- share of each pause (0.2)"),
    (
        ("--health-check-interval-secs",),
        "health_check_interval_s",
        float,
        "seconds between checks (default 10; SGLang's 60; 0 = off)",
    ),
    (("--health-check-timeout-secs",), "health_check_timeout_s", float, "seconds per health check (5)"),
    (("--health-check-endpoint",), "health_check_endpoint", str, "the engines' health path (/health)"),
    (("--health-failure-threshold",), "health_failure_threshold", int, "failed checks before unhealthy"),
    (
        ("--health-success-threshold",),
        "health_success_threshold",
        int,
        "good checks restoring an unhealthy worker (default 1; SGLang's 2)",
    ),
    (
        ("--worker-startup-timeout-secs",),
        "worker_startup_timeout_s",
        float,
        "a worker not healthy this long after it was added is rejected (1800; 0 = wait forever)",
    ),
    (
        ("--worker-startup-check-interval", "--registration-retry-secs"),
        "registration_retry_s",
        float,
        "seconds between health checks while a worker starts (default 1; SGLang's 30)",
    ),
    (
        ("--worker-startup-delay",),
        "worker_startup_delay_s",
        float,
        "seconds before a new worker's first check",
    ),
    (("--cb-failure-threshold",), "circuit_failure_threshold", int, "failures opening the breaker (0 = off)"),
    (
        ("--cb-success-threshold",),
        "circuit_success_threshold",
        int,
        "half-open successes closing the breaker",
    ),
    (("--cb-timeout-duration-secs",), "circuit_cooldown_s", float, "seconds a breaker stays open"),
    (("--cb-half-open-probes",), "circuit_half_open_probes", int, "requests a half-open breaker admits"),
    (
        ("--cb-max-ejection-percent",),
        "circuit_max_ejection_percent",
        float,
        "most of the fleet breakers may hold open, in %% (default 50; 100 = no cap)",
    ),
    (
        ("--cb-min-in-rotation",),
        "circuit_min_in_rotation",
        int,
        "routable workers a breaker never takes the fleet below (default 1)",
    ),
    (
        ("--load-poll-interval-secs",),
        "load_poll_interval_s",
        float,
        "seconds between /get_load polls (0 = off)",
    ),
    (
        ("--shutdown-grace-period-secs",),
        "shutdown_grace_period_s",
        float,
        "on SIGTERM, seconds in-flight requests get to finish (180)",
    ),
    (
        ("--prometheus-port",),
        "prometheus_port",
        int,
        "separate metrics listener on this port (default none: /metrics on the main port; SGLang's 29000)",
    ),
    (("--prometheus-host",), "prometheus_host", str, "address of the metrics listener (0.0.0.0)"),
    (
        ("--health-check-port",),
        "health_check_port",
        int,
        "also serve /health, /liveness, /readiness on this port",
    ),
    (
        ("--prefill-policy",),
        "prefill_policy",
        str,
        "PD: prefill pool's policy (default --policy, else kv_aware)",
    ),
    (
        ("--decode-policy",),
        "decode_policy",
        str,
        "PD: decode pool's policy (default --policy, else least_load)",
    ),
    (
        ("--pd-local-prefill-max-tokens",),
        "pd_local_prefill_max_tokens",
        int,
        "PD: uncached prompts up to this many tokens run on a --worker-urls worker alone (0 = never)",
    ),
    (
        ("--redis-url",),
        "redis_url",
        str,
        "replicas: share load and membership through this Redis (smg: its conversation store)",
    ),
    (
        ("--replica-id",),
        "replica_id",
        str,
        "replicas: this replica's name in Redis (default host-pid-random)",
    ),
    (("--sync-interval-s",), "sync_interval_s", float, "replicas: seconds between load syncs (default 0.2)"),
    (("--replica-ttl-s",), "replica_ttl_s", float, "replicas: seconds a silent replica counts (default 2)"),
    (("--redis-key-prefix",), "redis_key_prefix", str, "replicas: Redis key namespace (default kvroute)"),
    (
        ("--tenant-header",),
        "tenant_header",
        str,
        "tenants: header naming the tenant, set by a trusted gateway (default: API keys only)",
    ),
    (
        ("--admission-max-queue",),
        "admission_max_queue",
        int,
        "tenants: requests waiting in the router queue at most (429 past it; default 4096)",
    ),
    (
        ("--admission-prefill-tokens-per-s",),
        "admission_prefill_tokens_per_s",
        float,
        "tenants: one engine's prefill rate, tokens/s, to turn queued prefill into a wait (default 35000)",
    ),
    (
        ("--admission-max-queued-prefill-tokens",),
        "admission_max_queued_prefill_tokens",
        int,
        "tenants: prefill queued ahead on a worker before it counts as full (default 32768; 0 = none)",
    ),
    (("--log-level",), "log_level", str, "debug | info | warn | warning | error"),
    (("--log-dir",), "log_dir", str, "also write the log to LOG_DIR/kvroute.log"),
    (
        ("--tls-cert-path",),
        "tls_cert_path",
        str,
        "serve HTTPS with this PEM certificate (and --tls-key-path)",
    ),
    (("--tls-key-path",), "tls_key_path", str, "the PEM private key of --tls-cert-path"),
    (("--access-log",), "access_log", str, "JSON-lines access log file, one line per request ('-' = stdout)"),
    (
        ("--recent-requests",),
        "recent_requests",
        int,
        "finished requests kept for /admin/requests/recent (default 1000; 0 = off)",
    ),
    (
        ("--otlp-traces-endpoint",),
        "otlp_traces_endpoint",
        str,
        "OpenTelemetry: OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces (off by default)",
    ),
    (("--trace-sample-ratio",), "trace_sample_ratio", float, "fraction of requests traced (default 1.0)"),
]

# SGLang-router flags translated onto kvroute settings after the merge (router/peer_flags.py: MAPPED).
# (flag, argparse nargs or None for one value, help)
_MAPPED_FLAGS: list[tuple[str, str | None, str]] = [
    ("--retry-max-retries", None, "SGLang's: total attempts (kvroute --max-retries N-1)"),
    (
        "--request-id-headers",
        "*",
        "headers read for the request id, first present wins (first: the one sent)",
    ),
    ("--routing-key-headers", "*", "smg's: the first names consistent_hash's session header"),
    ("--cache-threshold", None, "cache_aware: matched share of the prompt to follow the cache (0.3)"),
    ("--cache-match-threshold", None, "smg's name of --cache-threshold"),
    ("--balance-abs-threshold", None, "cache_aware: imbalance, absolute (64 requests)"),
    ("--spill-abs-threshold", None, "smg's name of --balance-abs-threshold"),
    ("--balance-rel-threshold", None, "cache_aware: imbalance, relative (1.5)"),
    ("--spill-rel-threshold", None, "smg's name of --balance-rel-threshold"),
    ("--eviction-interval-secs", None, "cache_aware: seconds between expiry sweeps (60)"),
    ("--max-tree-size", None, "cache_aware: SGLang's characters, as blocks at 4 characters per token"),
    ("--cache-ttl-secs", None, "cache_aware: seconds a routed prompt counts as cached (kvroute 600)"),
    ("--load-monitor-interval", None, "smg's name of --load-poll-interval-secs"),
    ("--model-path", None, "a local model directory whose tokenizer kvroute uses (--tokenizer)"),
    ("--model", None, "smg's name of --model-path"),
    ("--tenant-header-name", None, "smg's: with --trust-tenant-header, the tenant header (x-smg-tenant-id)"),
]
# cache_aware param of each tuning flag
_CACHE_AWARE_FLAGS = {
    "cache_threshold": "cache_threshold",
    "cache_match_threshold": "cache_threshold",
    "balance_abs_threshold": "balance_abs_threshold",
    "spill_abs_threshold": "balance_abs_threshold",
    "balance_rel_threshold": "balance_rel_threshold",
    "spill_rel_threshold": "balance_rel_threshold",
    "eviction_interval_secs": "eviction_interval_secs",
    "max_tree_size": "max_tree_size",
    "cache_ttl_secs": "ttl_secs",
}
_CHARS_PER_TOKEN = 4  # SGLang's cache_aware tree counts characters


def _dest(flag: str) -> str:
    return "peer_" + flag.lstrip("-").replace("-", "_")


def build_serve_parser(prog: str = "kvroute serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the KV-cache-aware router. Every flag of SGLang's router (sglang-router 0.3.2, smg "
        "1.13) is accepted: same meaning, mapped, or refused with the reason (docs/operations.md).",
    )
    p.add_argument("--config", default=None, help="TOML/YAML/JSON config file (CLI > KVROUTE_* env > file)")
    p.add_argument("--worker-urls", nargs="*", default=None, help="engine URLs to register at start-up")
    p.add_argument(
        "--kv-events",
        nargs="*",
        default=None,
        metavar="URL=ENDPOINT",
        help="event endpoint of a worker, overriding /server_info (e.g. http://w:30000=tcp://w:5557; "
        "prefix bind: when the engine's publisher connects to it: http://w:30000=bind:tcp://*:5557)",
    )
    p.add_argument(
        "--kv-events-socket",
        dest="kv_events_socket",
        choices=("auto", "connect", "bind"),
        default=None,
        help="which side binds the event sockets: auto (from the engine's --kv-events-config, as SGLang: a "
        "wildcard endpoint is bound by the engine, a concrete address is connected to by it), connect, bind",
    )
    p.add_argument(
        "--policy-param",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="policy parameter, repeatable; values read as JSON when they parse",
    )
    for flags, dest, typ, help_ in _SERVE_FLAGS:
        p.add_argument(*flags, dest=dest, type=typ, default=None, help=help_)
    pd = p.add_argument_group("prefill/decode disaggregation (flags as SGLang's router)")
    pd.add_argument(
        "--pd-disaggregation", action="store_true", default=None, help="route through prefill/decode pairs"
    )
    pd.add_argument(
        "--prefill",
        nargs="+",
        action="append",
        default=None,
        metavar=("URL", "BOOTSTRAP_PORT"),
        help="a prefill server, optionally with its bootstrap port or 'none' (repeatable)",
    )
    pd.add_argument(
        "--decode", action="append", default=None, metavar="URL", help="a decode server (repeatable)"
    )
    add_autoscale_flags(p)
    p.add_argument(
        "--redis-share-records",
        action="store_true",
        default=None,
        help="replicas: share cache_aware routing records through Redis",
    )
    t = p.add_argument_group("tenants and admission control (docs/tenants.md)")
    t.add_argument(
        "--require-api-key",
        action="store_true",
        default=None,
        help="401 for requests whose key (or tenant header) matches no tenant",
    )
    t.add_argument(
        "--admission", action="store_true", default=None, help="admission control with no tenants configured"
    )
    t.add_argument(
        "--no-engine-priority",
        dest="engine_priority",
        action="store_false",
        default=None,
        help="do not forward the class priority as SGLang's `priority` field",
    )
    add_discovery_flags(p)
    p.add_argument("--dp-aware", action="store_true", default=None, help="route to data-parallel ranks")
    p.add_argument("--log-json", action="store_true", default=None, help="one JSON object per log line")
    p.add_argument("--disable-retries", action="store_true", help="same as --max-retries 0")
    p.add_argument("--disable-circuit-breaker", action="store_true", help="same as --cb-failure-threshold 0")
    p.add_argument(
        "--disable-health-check", action="store_true", help="same as --health-check-interval-secs 0"
    )
    mapped = p.add_argument_group("SGLang router flags translated onto kvroute's (router/peer_flags.py)")
    for flag, nargs, help_ in _MAPPED_FLAGS:
        mapped.add_argument(flag, dest=_dest(flag), nargs=nargs, default=None, help=help_)
    mapped.add_argument(
        "--tenant-api-key",
        dest="peer_tenant_api_key",
        action="append",
        default=None,
        metavar="TENANT:KEY",
        help="smg's: that key identifies that tenant (repeatable)",
    )
    mapped.add_argument(
        "--trust-tenant-header",
        dest="peer_trust_tenant_header",
        action="store_true",
        default=None,
        help="smg's: trust the tenant header named by --tenant-header-name",
    )
    _add_peer_flags(p)
    return p


# Service discovery (docs/discovery.md): (flags, config field, type, nargs, help). Names as sglang-router's
# and smg's `--service-discovery` flags; the DNS ones are kvroute's own (neither peer resolves DNS).
_DISCOVERY_FLAGS: list[tuple[tuple[str, ...], str, Any, str | None, str]] = [
    (("--discovery-provider",), "discovery_provider", str, None, "kubernetes | dns | file"),
    (("--selector",), "selector", str, "+", "Kubernetes label selector of worker pods (key=value ...)"),
    (("--prefill-selector",), "prefill_selector", str, "+", "PD: label selector of prefill pods"),
    (("--decode-selector",), "decode_selector", str, "+", "PD: label selector of decode pods"),
    (("--service-discovery-port",), "service_discovery_port", int, None, "engine port of discovered workers"),
    (("--service-discovery-namespace",), "service_discovery_namespace", str, None, "namespace (default all)"),
    (
        ("--bootstrap-port-annotation",),
        "bootstrap_port_annotation",
        str,
        None,
        "prefill pods' bootstrap port",
    ),
    (("--discovery-file",), "discovery_file", str, None, "JSON/YAML worker list, re-read when replaced"),
    (
        ("--discovery-check-interval-secs",),
        "discovery_check_interval_s",
        float,
        None,
        "seconds between file re-reads and DNS re-resolves (default 30)",
    ),
    (
        ("--discovery-dns-name",),
        "discovery_dns_name",
        str,
        None,
        "DNS name of the workers (headless service)",
    ),
    (("--discovery-dns-prefill-name",), "discovery_dns_prefill_name", str, None, "PD: DNS name of prefill"),
    (("--discovery-dns-decode-name",), "discovery_dns_decode_name", str, None, "PD: DNS name of decode"),
    (("--discovery-dns-record",), "discovery_dns_record", str, None, "A (A+AAAA) or SRV (default A)"),
    (
        ("--discovery-dns-server",),
        "discovery_dns_server",
        str,
        None,
        "nameserver HOST[:PORT] (default system)",
    ),
    (
        ("--discovery-dns-grace-secs",),
        "discovery_dns_grace_s",
        float,
        None,
        "seconds a name that stops resolving keeps its workers (default 30)",
    ),
]


def add_discovery_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("service discovery (flags as sglang-router / smg; docs/discovery.md)")
    g.add_argument(
        "--service-discovery", action="store_true", default=None, help="discover workers on Kubernetes"
    )
    for flags, dest, typ, nargs, help_ in _DISCOVERY_FLAGS:
        g.add_argument(*flags, dest=dest, type=typ, nargs=nargs, default=None, help=help_)


def _add_peer_flags(p: argparse.ArgumentParser) -> None:
    """The peers' flags kvroute has no setting for: accepted, then warned about or refused (with why)."""
    from kvroute.router.peer_flags import PEER_FLAGS, Support

    known = {s for a in p._actions for s in a.option_strings}
    g = p.add_argument_group(
        "SGLang router flags without effect (a warning says why) or refused at start-up (the error says why)"
    )
    for flag, spec in PEER_FLAGS.items():
        if flag in known:
            continue
        if spec.support not in (Support.INERT, Support.REFUSED):
            raise AssertionError(f"{flag} is {spec.support} in router/peer_flags.py but not a serve flag")
        word = "no effect" if spec.support is Support.INERT else "refused"
        help_ = f"{word}: {spec.note}".replace("%", "%%")
        if spec.arity == "0":
            g.add_argument(flag, dest=_dest(flag), action="store_true", default=None, help=help_)
        else:
            nargs = None if spec.arity == "1" else spec.arity
            g.add_argument(flag, dest=_dest(flag), nargs=nargs, default=None, help=help_)


def peer_flag_effects(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for the inert and refused peer flags given on the command line."""
    from kvroute.router.peer_flags import PEER_FLAGS, Support, refusal

    refused: list[str] = []
    warnings: list[str] = []
    for flag, spec in PEER_FLAGS.items():
        value = getattr(args, _dest(flag), None)
        if value is None or spec.support in (Support.SAME, Support.MAPPED):
            continue
        values = [] if value is True else [str(v) for v in value] if isinstance(value, list) else [str(value)]
        why = refusal(flag, values)
        if why is not None:
            refused.append(why)
        elif spec.support is Support.INERT:
            warnings.append(f"{flag} has no effect in kvroute: {spec.note}")
    return refused, warnings


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> RouterConfig:
    """ConfigError for bad values and for refused SGLang-router flags (router/peer_flags.py)."""
    refused, _ = peer_flag_effects(args)
    if refused:
        raise ConfigError(refused[0] if len(refused) == 1 else "; ".join(refused))
    cli: dict[str, Any] = {dest: getattr(args, dest) for _, dest, _, _ in _SERVE_FLAGS}
    cli.update({dest: getattr(args, dest) for _, dest, _, _, _ in _DISCOVERY_FLAGS})
    cli["service_discovery"] = args.service_discovery
    cli["config"] = args.config
    cli["worker_urls"] = args.worker_urls
    cli["kv_events"] = args.kv_events
    cli["kv_events_socket"] = args.kv_events_socket
    cli["policy_params"] = args.policy_param
    cli["pd_disaggregation"] = args.pd_disaggregation
    cli["prefill_urls"] = args.prefill
    cli["decode_urls"] = args.decode
    cli["redis_share_records"] = args.redis_share_records
    cli["require_api_key"] = args.require_api_key
    cli["admission"] = args.admission
    cli["engine_priority"] = args.engine_priority
    cli.update(autoscale_flags(args))
    cli["dp_aware"] = args.dp_aware
    cli["log_json"] = args.log_json
    if cli.get("log_level") == "warn":
        cli["log_level"] = "warning"
    if args.disable_retries:
        cli["max_retries"] = 0
    if args.disable_circuit_breaker:
        cli["circuit_failure_threshold"] = 0
    if args.disable_health_check:
        cli["health_check_interval_s"] = 0
    _map_peer_flags(args, cli)
    config = build_config(cli, environ=os.environ if environ is None else environ)
    return _map_cache_aware(args, config)


def _map_peer_flags(args: argparse.Namespace, cli: dict[str, Any]) -> None:
    """The MAPPED peer flags that translate to one config value each (CLI layer: they beat env and file)."""
    v = getattr(args, "peer_retry_max_retries", None)
    if v is not None and not args.disable_retries:
        try:
            cli["max_retries"] = max(0, int(v) - 1)
        except ValueError as exc:
            raise ConfigError(f"--retry-max-retries: expected an integer, got {v!r}") from exc
    headers = args.peer_request_id_headers
    if headers:
        cli["request_id_header"] = headers[0]
        cli["request_id_headers"] = tuple(headers[1:])
    if args.peer_routing_key_headers:
        cli["session_header"] = args.peer_routing_key_headers[0]
    for name in ("peer_load_monitor_interval",):
        if getattr(args, name) is not None and cli.get("load_poll_interval_s") is None:
            cli["load_poll_interval_s"] = getattr(args, name)
    if args.peer_trust_tenant_header and cli.get("tenant_header") is None:
        cli["tenant_header"] = args.peer_tenant_header_name or "x-smg-tenant-id"
    if args.peer_tenant_api_key:
        tenants: dict[str, dict[str, list[str]]] = {}
        for item in args.peer_tenant_api_key:
            tenant, sep, key = str(item).partition(":")
            if not sep or not tenant or not key:
                raise ConfigError(f"--tenant-api-key: expected TENANT:KEY, got {item!r}")
            tenants.setdefault(tenant, {"api_keys": []})["api_keys"].append(key)
        cli["tenants"] = tenants
    model = args.peer_model_path or args.peer_model
    if model is not None and cli.get("tokenizer") is None:
        cli["tokenizer"] = model


def _map_cache_aware(args: argparse.Namespace, config: RouterConfig) -> RouterConfig:
    params: dict[str, str] = dict(config.cache_aware_params)
    for flag_name, param in _CACHE_AWARE_FLAGS.items():
        value = getattr(args, "peer_" + flag_name, None)
        if value is None:
            continue
        if flag_name == "max_tree_size":
            try:
                value = str(max(1, int(value) // (_CHARS_PER_TOKEN * config.block_size)))
            except ValueError as exc:
                raise ConfigError(f"--max-tree-size: expected an integer, got {value!r}") from exc
        params[param] = str(value)
    if not params:
        return config
    return replace(config, cache_aware_params=tuple(params.items()))


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line (`--log-json`): time, level, logger, message, and the traceback if any."""

    def __init__(self, tag: str = "") -> None:
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        import orjson

        out: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.tag:
            out["process"] = self.tag
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def setup_logging(level: str, tag: str = "", log_dir: str | None = None, log_json: bool = False) -> None:
    """`tag`: names the process in every line (`serve --processes N` runs N of them on one stderr).
    `log_dir`: also append to LOG_DIR/kvroute.log (created when missing)."""
    formatter: logging.Formatter = (
        JsonLogFormatter(tag)
        if log_json
        else logging.Formatter(f"%(asctime)s %(levelname)s {tag + ' ' if tag else ''}%(name)s: %(message)s")
    )
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_dir:
        try:
            os.makedirs(log_dir, exist_ok=True)
            handlers.append(logging.FileHandler(os.path.join(log_dir, "kvroute.log")))
        except OSError as exc:
            raise ConfigError(f"--log-dir {log_dir}: {exc.strerror}") from exc
    for h in handlers:
        h.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=handlers)


async def serve(
    config: RouterConfig, ready: Callable[[str], None] | None = None, reuse_port: bool = False
) -> None:
    """Run the router until SIGINT/SIGTERM; `ready(url)` is called once it listens. `reuse_port`: share
    the port with the other processes of `serve --processes N` (off otherwise: a second router on a
    taken port must fail, not split the traffic). On the signal, in-flight requests get
    `shutdown_grace_period_s` to finish. The optional metrics and health listeners
    (`--prometheus-port`, `--health-check-port`) serve the same state."""
    from aiohttp import web

    from kvroute.router.app import METRICS, PROXY, create_app, create_side_app
    from kvroute.router.server import RouterRunner, raise_descriptor_limit

    ssl_context = _tls_context(config)  # before anything starts: a bad certificate stops here
    nofile = raise_descriptor_limit()
    app = create_app(config)
    runner = RouterRunner(app, config, app[METRICS])
    await runner.setup()
    site = web.TCPSite(
        runner,
        config.host,
        config.port,
        backlog=1024,
        reuse_port=reuse_port or None,
        ssl_context=ssl_context,
    )
    side_runners: list[web.AppRunner] = []
    try:
        await site.start()
        for port, host, what in (
            (config.prometheus_port, config.prometheus_host, "metrics"),
            (config.health_check_port, config.host, "health"),
        ):
            if port:
                side = web.AppRunner(create_side_app(app, what), access_log=None)
                await side.setup()
                side_runners.append(side)
                await web.TCPSite(side, host, port, reuse_port=reuse_port or None).start()
                log.info("kvroute %s listener on http://%s:%d", what, host, port)
    except BaseException:  # the app has started (registry, Redis tasks): stop it before saying why
        for side in side_runners:
            await side.cleanup()
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    url = f"{'https' if ssl_context else 'http'}://{host}:{port}"
    log.info(
        "kvroute listening on %s (policy=%s, block_size=%d, workers=%d; at most %d client connections, "
        "descriptor limit %d)",
        url,
        config.policy,
        config.block_size,
        len(config.worker_urls),
        runner.guard.max_connections,
        nofile,
    )
    if ready:
        ready(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        proxy = app.get(PROXY)
        log.info(
            "shutting down: %d client connections open, %d requests in flight; waiting up to %.0fs "
            "(--shutdown-grace-period-secs) for them",
            runner.open_connections(),
            proxy.in_flight if proxy is not None else 0,
            config.shutdown_grace_period_s,
        )
    finally:
        for side in side_runners:
            await side.cleanup()
        await runner.cleanup()
        log.info("kvroute stopped")


def _tls_context(config: RouterConfig) -> Any:
    """The server TLS context of `--tls-cert-path/--tls-key-path` (None: plain HTTP); ConfigError when the
    files cannot be loaded."""
    if not config.tls_cert_path or not config.tls_key_path:
        return None
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.tls_cert_path, config.tls_key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--tls-cert-path/--tls-key-path: cannot load: {exc}") from exc
    return ctx


def run_async(coro: Any) -> Any:
    """Run on uvloop when installed (it is a dependency), else the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


def cmd_serve(argv: Sequence[str]) -> int:
    args = build_serve_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        setup_logging(config.log_level, log_dir=config.log_dir, log_json=config.log_json)
    except ConfigError as exc:
        print(f"kvroute serve: {exc}", file=sys.stderr)
        return 2
    for warning in unknown_env(os.environ):
        log.warning("%s", warning)
    for warning in peer_flag_effects(args)[1]:
        log.warning("%s", warning)
    if config.redis_url and config.processes == 1:
        log.info("--redis-url: router replicas share load and membership there (not a conversation store)")
    if config.processes > 1:
        from kvroute.router.supervisor import ServeSupervisor

        return ServeSupervisor(config).run()
    try:
        run_async(serve(config))
    except ConfigError as exc:  # found while building the app (unknown policy, bad policy params)
        print(f"kvroute serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"kvroute serve: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_sim(argv: Sequence[str]) -> int:
    from kvroute.engines.sim.fleet import main as sim_main

    return int(sim_main(list(argv)) or 0)


def cmd_demo(argv: Sequence[str]) -> int:
    from kvroute.router.demo import main as demo_main

    return demo_main(list(argv))


def missing_extra(extra: str, modules: Sequence[str]) -> str | None:
    """One line naming what to install when an optional extra's modules are absent, else None."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"needs the '{extra}' extra ({', '.join(missing)} not installed): pip install 'kvroute[{extra}]'"


def cmd_bench(argv: Sequence[str]) -> int:
    """The load generator needs tqdm (the `bench` extra); plots (matplotlib) and SGLang's router are
    skipped with a note when absent."""
    problem = missing_extra("bench", ("tqdm",))
    if problem and not {"-h", "--help"} & set(argv):
        print(f"kvroute bench: {problem}", file=sys.stderr)
        return 2
    from kvroute.bench.compare import main as bench_main

    return int(bench_main(list(argv)) or 0)


def cmd_plan(argv: Sequence[str]) -> int:
    from kvroute.router.planner import main as plan_main

    return int(plan_main(list(argv)) or 0)


def cmd_engine(argv: Sequence[str]) -> int:
    """The GPU engine needs PyTorch (and a GPU); without it, say so instead of a traceback.

    `kvroute.engines.gpu.launch` imports torch lazily too, so the guard covers the call as well as the import.
    """
    try:
        from kvroute.engines.gpu.launch import main as engine_main

        return int(engine_main(list(argv)) or 0)
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] not in ("torch", "triton"):
            raise
        print(
            f"kvroute engine: needs PyTorch ({exc.name} is not installed); install torch with CUDA "
            "support on a machine with an NVIDIA GPU",
            file=sys.stderr,
        )
        return 2


def cmd_diagnose(argv: Sequence[str]) -> int:
    from kvroute.router.observability.diagnose import main as diagnose_main

    return diagnose_main(argv)


# Subcommand -> (handler, one-line help). Handlers import their module lazily (fast start, optional deps).
COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "serve": (cmd_serve, "run the router (flags as SGLang's router)"),
    "sim": (cmd_sim, "run a simulated SGLang fleet"),
    "demo": (cmd_demo, "simulated fleet + router: round_robin vs kv_aware on a shared-prefix load"),
    "bench": (cmd_bench, "benchmark routers/policies side by side (bench/compare.py)"),
    "plan": (cmd_plan, "recommend prefill/decode worker counts for a load (PD planner)"),
    "diagnose": (cmd_diagnose, "why is TTFT high right now, and on which worker (reads a running router)"),
    "engine": (cmd_engine, "run the GPU engine (needs PyTorch and a CUDA GPU)"),
}


def usage() -> str:
    lines = ["usage: kvroute COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`kvroute COMMAND --help` for a command's flags; `kvroute --version`.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version", "version"):
        print(f"kvroute {__version__}")
        return 0
    entry = COMMANDS.get(argv[0])
    if entry is None:
        print(f"kvroute: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return entry[0](argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
