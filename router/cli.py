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

from router._version import __version__
from router.autoscale.flags import add_flags as add_autoscale_flags
from router.autoscale.flags import from_args as autoscale_flags
from router.config import ConfigError, RouterConfig, build_config, unknown_env

log = logging.getLogger("kvroute")

# (flags, config field, type, help). Every default is None: unset flags fall through to env/file/defaults.
_SERVE_FLAGS: list[tuple[tuple[str, ...], str, Any, str]] = [
    (("--host",), "host", str, "address to bind (default 127.0.0.1)"),
    (("--port",), "port", int, "port to bind (default 30000; 0 = any free port)"),
    (("--policy",), "policy", str, "routing policy (default kv_aware)"),
    (
        ("--processes",),
        "processes",
        int,
        "serving processes on the port (SO_REUSEPORT), sharing state through --redis-url (default 1)",
    ),
    (("--block-size",), "block_size", int, "tokens per KV block, a multiple of every engine's --page-size (default 16)"),
    (
        ("--tokenizer", "--tokenizer-path"),
        "tokenizer",
        str,
        "local Hugging Face tokenizer dir or tokenizer.json",
    ),
    (("--model-seed",), "model_seed", str, "block-hash namespace (model identity); default shared"),
    (("--admin-token",), "admin_token", str, "bearer token for /admin/* (env KVROUTE_ADMIN_TOKEN)"),
    (
        ("--max-body-bytes", "--max-payload-size"),
        "max_body_bytes",
        int,
        "request body limit in bytes (0 = none)",
    ),
    (("--connect-timeout-secs",), "connect_timeout_s", float, "seconds to connect to an engine (0 = none)"),
    (("--request-timeout-secs",), "request_timeout_s", float, "seconds per upstream request (0 = none)"),
    (("--stream-idle-timeout-secs",), "stream_idle_timeout_s", float, "seconds between chunks (0 = none)"),
    (
        ("--max-retries", "--retry-max-retries"),
        "max_retries",
        int,
        "other workers tried before a reply (0 = none)",
    ),
    (("--health-check-interval-secs",), "health_check_interval_s", float, "seconds between checks (0 = off)"),
    (("--health-failure-threshold",), "health_failure_threshold", int, "failed checks before unhealthy"),
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
        "most of the fleet breakers may hold open, in % (default 50; 100 = no cap)",
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
    (("--prefill-policy",), "prefill_policy", str, "PD: prefill pool's policy (default kv_aware)"),
    (("--decode-policy",), "decode_policy", str, "PD: decode pool's policy (default least_load)"),
    (
        ("--pd-local-prefill-max-tokens",),
        "pd_local_prefill_max_tokens",
        int,
        "PD: uncached prompts up to this many tokens run on a --worker-urls worker alone (0 = never)",
    ),
    (("--redis-url",), "redis_url", str, "replicas: share load and membership through this Redis"),
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
    (("--log-level",), "log_level", str, "debug | info | warning | error"),
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
        "OpenTelemetry: OTLP/HTTP traces URL (needs kvroute[tracing]); off by default",
    ),
    (("--trace-sample-ratio",), "trace_sample_ratio", float, "fraction of requests traced (default 1.0)"),
]


def build_serve_parser(prog: str = "kvroute serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run the KV-cache-aware router.")
    p.add_argument("--config", default=None, help="TOML/YAML/JSON config file (CLI > KVROUTE_* env > file)")
    p.add_argument("--worker-urls", nargs="*", default=None, help="engine URLs to register at start-up")
    p.add_argument(
        "--kv-events",
        nargs="*",
        default=None,
        metavar="URL=ENDPOINT",
        help="event endpoint of a worker, overriding /server_info (e.g. http://w:30000=tcp://w:5557)",
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
    p.add_argument("--disable-retries", action="store_true", help="same as --max-retries 0")
    p.add_argument("--disable-circuit-breaker", action="store_true", help="same as --cb-failure-threshold 0")
    p.add_argument(
        "--disable-health-check", action="store_true", help="same as --health-check-interval-secs 0"
    )
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


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> RouterConfig:
    cli: dict[str, Any] = {dest: getattr(args, dest) for _, dest, _, _ in _SERVE_FLAGS}
    cli.update({dest: getattr(args, dest) for _, dest, _, _, _ in _DISCOVERY_FLAGS})
    cli["service_discovery"] = args.service_discovery
    cli["config"] = args.config
    cli["worker_urls"] = args.worker_urls
    cli["kv_events"] = args.kv_events
    cli["policy_params"] = args.policy_param
    cli["pd_disaggregation"] = args.pd_disaggregation
    cli["prefill_urls"] = args.prefill
    cli["decode_urls"] = args.decode
    cli["redis_share_records"] = args.redis_share_records
    cli["require_api_key"] = args.require_api_key
    cli["admission"] = args.admission
    cli["engine_priority"] = args.engine_priority
    cli.update(autoscale_flags(args))
    if args.disable_retries:
        cli["max_retries"] = 0
    if args.disable_circuit_breaker:
        cli["circuit_failure_threshold"] = 0
    if args.disable_health_check:
        cli["health_check_interval_s"] = 0
    return build_config(cli, environ=os.environ if environ is None else environ)


def setup_logging(level: str, tag: str = "") -> None:
    """`tag`: names the process in every line (`serve --processes N` runs N of them on one stderr)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {tag + ' ' if tag else ''}%(name)s: %(message)s",
    )


async def serve(
    config: RouterConfig, ready: Callable[[str], None] | None = None, reuse_port: bool = False
) -> None:
    """Run the router until SIGINT/SIGTERM; `ready(url)` is called once it listens. `reuse_port`: share
    the port with the other processes of `serve --processes N` (off otherwise: a second router on a
    taken port must fail, not split the traffic)."""
    from aiohttp import web

    from router.app import create_app

    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024, reuse_port=reuse_port or None)
    try:
        await site.start()
    except BaseException:  # the app has started (registry, Redis tasks): stop it before saying why
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    log.info(
        "kvroute listening on %s (policy=%s, block_size=%d, workers=%d)",
        url,
        config.policy,
        config.block_size,
        len(config.worker_urls),
    )
    if ready:
        ready(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


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
    except ConfigError as exc:
        print(f"kvroute serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    for warning in unknown_env(os.environ):
        log.warning("%s", warning)
    if config.processes > 1:
        from router.supervisor import ServeSupervisor

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
    from engines.sim.fleet import main as sim_main

    return int(sim_main(list(argv)) or 0)


def cmd_demo(argv: Sequence[str]) -> int:
    from router.demo import main as demo_main

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
    from bench.compare import main as bench_main

    return int(bench_main(list(argv)) or 0)


def cmd_plan(argv: Sequence[str]) -> int:
    from router.planner import main as plan_main

    return int(plan_main(list(argv)) or 0)


def cmd_engine(argv: Sequence[str]) -> int:
    """The GPU engine needs PyTorch (and a GPU); without it, say so instead of a traceback.

    `engines.gpu.launch` imports torch lazily too, so the guard covers the call as well as the import.
    """
    try:
        from engines.gpu.launch import main as engine_main

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
    from router.observability.diagnose import main as diagnose_main

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
