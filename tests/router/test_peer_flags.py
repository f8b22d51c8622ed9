"""Every flag of SGLang's routers (sglang-router 0.3.2, smg 1.13) is accounted for by `kvroute serve`.

The peers' flags come from their own argparse parsers, recorded in `tests/router/data/peer_flags.json`
(`scripts/record_peer_flags.py`); when the packages are installed the recording is compared with them.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from kvroute.router.cli import build_serve_parser, config_from_args, peer_flag_effects
from kvroute.router.config import ConfigError, RouterConfig, replace
from kvroute.router.peer_flags import PEER_FLAGS, Support, migration_table

DATA = Path(__file__).parent / "data" / "peer_flags.json"
ROOT = Path(__file__).resolve().parents[2]
RECORDED: dict[str, Any] = json.loads(DATA.read_text())


def _all_peer_flags() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for peer in RECORDED.values():
        for flag, meta in peer["flags"].items():
            out.setdefault(flag, meta)
    return out


PEER = _all_peer_flags()


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_serve_parser().parse_args(argv)


def test_every_peer_flag_is_in_the_table_and_nothing_else() -> None:
    assert len(PEER) >= 200  # both peers recorded (98 + smg's 221, mostly shared)
    missing = sorted(set(PEER) - set(PEER_FLAGS))
    stale = sorted(set(PEER_FLAGS) - set(PEER))
    assert not missing, f"peer flags with no entry in router/peer_flags.py: {missing}"
    assert not stale, f"entries of router/peer_flags.py no peer has: {stale}"


def test_arity_matches_the_peers() -> None:
    """A refused or inert flag must swallow exactly the values the peer's does (else the rest of the line
    would be mis-parsed)."""
    for flag, meta in PEER.items():
        assert PEER_FLAGS[flag].arity == meta["arity"], flag


def test_same_and_mapped_flags_are_real_serve_flags() -> None:
    parser = build_serve_parser()
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    for flag, spec in PEER_FLAGS.items():
        action = by_flag[flag]  # every flag parses (KeyError: not accepted at all)
        if spec.support in (Support.SAME, Support.MAPPED):
            assert not action.dest.startswith("peer_") or spec.support is Support.MAPPED, flag
            assert not action.help or not action.help.startswith(("no effect", "refused")), flag


@pytest.mark.parametrize("peer", sorted(RECORDED))
def test_recording_matches_the_installed_peer(peer: str) -> None:
    import importlib.util

    module = {"sglang-router": "sglang_router", "smg": "smg"}[peer]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{peer} not installed; the recorded copy stands")
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from record_peer_flags import peer_flags
    finally:
        sys.path.pop(0)
    live = peer_flags(peer)
    if live["version"] != RECORDED[peer]["version"]:
        pytest.skip(f"{peer} {live['version']} installed, {RECORDED[peer]['version']} recorded")
    assert sorted(live["flags"]) == sorted(RECORDED[peer]["flags"])


def test_operations_md_carries_the_generated_table() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    assert migration_table() in doc, "docs/operations.md: paste router.peer_flags.migration_table() output"


# Values for flags whose recorded default is None (or unusable as a sample).
_SAMPLES: dict[str, list[str]] = {
    "--worker-urls": ["http://127.0.0.1:9"],
    "--prefill": ["http://127.0.0.1:9", "8998"],
    "--decode": ["http://127.0.0.1:8"],
    "--api-key": ["secret"],
    "--prometheus-host": ["127.0.0.1"],
    "--prometheus-port": ["29000"],
    "--health-check-port": ["29001"],
    "--log-dir": ["LOGDIR"],
    "--request-id-headers": ["x-request-id", "x-trace-id"],
    "--routing-key-headers": ["x-session"],
    "--model-path": ["/models/llama"],
    "--model": ["/models/llama"],
    "--tokenizer-path": ["/models/llama"],
    "--redis-url": ["redis://127.0.0.1:6390/0"],
    "--selector": ["app=sglang"],
    "--tenant-api-key": ["team-a:key-1"],
    "--prefill-selector": ["role=prefill"],
    "--decode-selector": ["role=decode"],
    "--discovery-file": ["workers.json"],
    "--discovery-check-interval-secs": ["30"],
    "--log-level": ["warn"],
    "--policy": ["cache_aware"],
    "--prefill-policy": ["cache_aware"],
    "--decode-policy": ["power_of_two"],
    "--max-tree-size": ["67108864"],
}


# Flags that only make sense with others (the peers require the same companions).
_PD = ["--pd-disaggregation"]
_K8S = ["--service-discovery", "--selector", "app=sglang"]
_CONTEXT: dict[str, list[str]] = {
    "--prefill": _PD,
    "--decode": _PD,
    "--prefill-policy": _PD,
    "--decode-policy": _PD,
    "--mini-lb": _PD,
    "--prefill-selector": [*_PD, "--service-discovery"],
    "--decode-selector": [*_PD, "--service-discovery"],
    "--selector": ["--service-discovery"],
    "--service-discovery": ["--selector", "app=sglang"],
    "--service-discovery-port": _K8S,
    "--service-discovery-namespace": _K8S,
    "--discovery-provider": ["--selector", "app=sglang"],
    "--discovery-file": ["--discovery-provider", "file"],
    "--discovery-check-interval-secs": ["--discovery-provider", "file", "--discovery-file", "workers.json"],
    "--tls-cert-path": ["--tls-key-path", "key.pem"],  # the pair is required together, as a PEM pair
    "--tls-key-path": ["--tls-cert-path", "cert.pem"],
}


def _sample(flag: str, meta: dict[str, Any]) -> list[str]:
    if flag in _SAMPLES:
        return _SAMPLES[flag]
    if meta["arity"] == "0":
        return []
    if meta["choices"]:
        return [str(meta["choices"][0])]
    d = meta["default"]
    if d is None or isinstance(d, bool) or (isinstance(d, str) and d.startswith(("[", "{"))):
        return ["x"]
    return [str(d)]


@pytest.mark.parametrize("flag", sorted(PEER))
def test_each_peer_flag_is_taken_or_refused_with_its_reason(flag: str, tmp_path: Path) -> None:
    spec = PEER_FLAGS[flag]
    values = [v.replace("LOGDIR", str(tmp_path)) for v in _sample(flag, PEER[flag])]
    argv = [*_CONTEXT.get(flag, ["--worker-urls", "http://127.0.0.1:9"]), flag, *values]
    args = _parse(argv)
    refused, warnings = peer_flag_effects(args)
    if spec.support is Support.REFUSED and not (spec.accept and all(v in spec.accept for v in values)):
        with pytest.raises(ConfigError) as err:
            config_from_args(args, environ={})
        assert flag in str(err.value) and spec.note in str(err.value)
        return
    assert not refused
    if spec.support is Support.INERT:
        assert warnings == [f"{flag} has no effect in kvroute: {spec.note}"]
    else:
        assert warnings == []
    config = config_from_args(args, environ={})
    assert isinstance(config, RouterConfig)


def test_peer_values_land_in_the_config() -> None:
    """The translations, value by value (the table's notes say the same)."""
    argv = (
        "--worker-urls http://a:1 --policy cache_aware --cache-threshold 0.5 --balance-abs-threshold 32 "
        "--balance-rel-threshold 1.2 --eviction-interval-secs 30 --max-tree-size 67108864 "
        "--retry-max-retries 5 --retry-initial-backoff-ms 50 "
        "--request-id-headers x-correlation-id x-trace-id "
        "--api-key k1 --dp-aware --health-check-timeout-secs 2 --health-check-endpoint /health_generate "
        "--health-success-threshold 2 --worker-startup-timeout-secs 60 --worker-startup-check-interval 3 "
        "--shutdown-grace-period-secs 7 --prometheus-port 29000 --prometheus-host 127.0.0.1 --log-level warn "
        "--max-payload-size 1024 --request-timeout-secs 10 --load-monitor-interval 4"
    )
    c = config_from_args(_parse(argv.split()), environ={})
    assert dict(c.cache_aware_params) == {
        "cache_threshold": "0.5",
        "balance_abs_threshold": "32",
        "balance_rel_threshold": "1.2",
        "eviction_interval_secs": "30",
        "max_tree_size": str(2**26 // (4 * 16)),  # characters -> blocks of 16 tokens at 4 chars/token
    }
    assert c.max_retries == 4  # SGLang counts all 5 attempts; kvroute the 4 after the first
    assert c.retry_initial_backoff_ms == 50
    assert (c.request_id_header, c.request_id_headers) == ("x-correlation-id", ("x-trace-id",))
    assert (c.engine_api_key, c.dp_aware) == ("k1", True)
    assert (c.health_check_timeout_s, c.health_check_endpoint, c.health_success_threshold) == (
        2,
        "/health_generate",
        2,
    )
    assert (c.worker_startup_timeout_s, c.registration_retry_s, c.shutdown_grace_period_s) == (60, 3, 7)
    assert (c.prometheus_port, c.prometheus_host, c.log_level) == (29000, "127.0.0.1", "warning")
    assert (c.max_body_bytes, c.request_timeout_s, c.load_poll_interval_s) == (1024, 10, 4)


def test_tenant_flags_of_smg() -> None:
    argv = "--worker-urls http://a:1 --tenant-api-key team-a:k1 --tenant-api-key team-a:k2 "
    argv += "--tenant-api-key team-b:k3 --trust-tenant-header"
    c = config_from_args(_parse(argv.split()), environ={})
    assert c.tenants == {"team-a": {"api_keys": ["k1", "k2"]}, "team-b": {"api_keys": ["k3"]}}
    assert c.tenant_header == "x-smg-tenant-id" and c.admission_enabled
    c = config_from_args(_parse("--trust-tenant-header --tenant-header-name x-org".split()), environ={})
    assert c.tenant_header == "x-org"
    with pytest.raises(ConfigError, match="TENANT:KEY"):
        config_from_args(_parse("--tenant-api-key nokey".split()), environ={})


def test_defaults_that_follow_sglang() -> None:
    c = RouterConfig()
    assert c.max_body_bytes == 512 * 1024 * 1024  # a 40 MB request is no longer a 413
    assert c.request_timeout_s == 1800
    assert c.shutdown_grace_period_s == 180


def test_policy_sets_both_pd_pools_unless_named() -> None:
    base = "--pd-disaggregation --prefill http://p:1 --decode http://d:1"
    c = config_from_args(_parse(f"{base} --policy cache_aware".split()), environ={})
    assert (c.policy, c.prefill_policy, c.decode_policy) == ("cache_aware", "cache_aware", "cache_aware")
    argv = f"{base} --policy round_robin --decode-policy least_load"
    c = config_from_args(_parse(argv.split()), environ={})
    assert (c.prefill_policy, c.decode_policy) == ("round_robin", "least_load")
    c = config_from_args(_parse(base.split()), environ={})
    assert (c.prefill_policy, c.decode_policy) == ("kv_aware", "least_load")  # kvroute's own defaults
    c = config_from_args(_parse(f"{base} --policy consistent_hashing".split()), environ={})
    assert (c.policy, c.decode_policy) == ("consistent_hash", "consistent_hash")  # smg's name


def test_cache_aware_tuning_reaches_the_pd_pools() -> None:
    from kvroute.router.app import pd_config

    argv = "--pd-disaggregation --prefill http://p:1 --decode http://d:1 --policy cache_aware "
    argv += "--cache-threshold 0.7"
    cfg = pd_config(config_from_args(_parse(argv.split()), environ={}))
    assert dict(cfg.prefill_policy_params) == {"cache_threshold": 0.7}
    assert dict(cfg.decode_policy_params) == {"cache_threshold": 0.7}


def _help_examples(description: str) -> list[str]:
    """The command lines of a peer's `--help` examples (continuation lines joined, comments dropped)."""
    lines: list[str] = []
    current: list[str] = []
    for raw in description.splitlines():
        line = raw.split("#", 1)[0].rstrip() if not raw.strip().startswith("#") else ""
        if not line.strip() and not current:
            continue
        if "launch_router" in line or current:
            cont = line.endswith("\\")
            current.append(line.rstrip("\\").strip())
            if not cont:
                lines.append(" ".join(p for p in current if p))
                current = []
    return lines


# The examples of `python -m sglang_router.launch_router --help` and `smg launch --help` (0.3.2 / 1.13),
# as printed; the EPD one is smg's only.
PEER_HELP_EXAMPLES = """
  python -m sglang_router.launch_router --worker-urls http://worker1:8000 http://worker2:8000

  python -m sglang_router.launch_router --pd-disaggregation \\
    --prefill http://prefill1:8000 9000 --prefill http://prefill2:8000 \\
    --decode http://decode1:8001 --decode http://decode2:8001 \\
    --policy cache_aware

  python -m sglang_router.launch_router --pd-disaggregation \\
    --prefill http://prefill1:8000 9000 \\    # With bootstrap port
    --prefill http://prefill2:8000 none \\    # Explicitly no bootstrap port
    --prefill http://prefill3:8000 \\         # Defaults to no bootstrap port
    --decode http://decode1:8001 --decode http://decode2:8001

  python -m sglang_router.launch_router --pd-disaggregation \\
    --prefill http://prefill1:8000 --prefill http://prefill2:8000 \\
    --decode http://decode1:8001 --decode http://decode2:8001 \\
    --prefill-policy cache_aware --decode-policy power_of_two

  python -m smg.launch_router --epd-disaggregation \\
    --encode http://encode1:8000 9000 \\
    --prefill http://prefill1:8000 9001 \\
    --decode http://decode1:8001 \\
    --encode-policy consistent_hashing
"""

# Command lines from the peers' READMEs and docs that the issue lists as failing before.
PEER_DOC_LINES = [
    "--worker-urls http://w1:8000 http://w2:8000 --policy cache_aware --cache-threshold 0.5 "
    "--balance-abs-threshold 32 --balance-rel-threshold 1.0001 --eviction-interval-secs 60 "
    "--max-tree-size 16777216",
    "--worker-urls http://w1:8000 --prometheus-port 29000 --prometheus-host 127.0.0.1 --log-dir LOGDIR",
    "--worker-urls http://w1:8000 --retry-max-retries 3 --retry-initial-backoff-ms 100 "
    "--retry-max-backoff-ms 10000 --retry-backoff-multiplier 2.0 --retry-jitter-factor 0.1",
    "--worker-urls http://w1:8000 --dp-aware --api-key sk-engine",
    "--worker-urls http://w1:8000 --cb-failure-threshold 5 --cb-success-threshold 2 "
    "--cb-timeout-duration-secs 30 --cb-window-duration-secs 60",
    "--worker-urls http://w1:8000 --health-failure-threshold 2 --health-success-threshold 1 "
    "--health-check-timeout-secs 3 --health-check-interval-secs 30 --health-check-endpoint /health",
    "--worker-urls http://w1:8000 --request-id-headers x-request-id x-trace-id "
    "--shutdown-grace-period-secs 30",
]
REFUSED_DOC_LINES = {
    "--service-discovery --selector app=sglang-worker --router-selector app=router": "--router-selector",
    "--worker-urls http://w1:8000 --max-concurrent-requests 100 --rate-limit-tokens-per-second 100": (
        "--max-concurrent-requests 100"
    ),
    "--worker-urls http://w1:8000 --history-backend postgres --postgres-db-url postgres://x": (
        "--history-backend postgres"
    ),
}


def _argv(line: str) -> list[str]:
    words = shlex.split(line)
    if words and words[0] == "python":
        words = words[3:]  # python -m MODULE
    return words


def test_help_examples_parse_and_mean_the_same() -> None:
    examples = _help_examples(PEER_HELP_EXAMPLES)
    assert len(examples) == 5
    configs = []
    for line in examples[:4]:
        configs.append(config_from_args(_parse(_argv(line)), environ={}))
    assert configs[0].worker_urls == ("http://worker1:8000", "http://worker2:8000")
    assert configs[1].prefill_urls == (("http://prefill1:8000", 9000), ("http://prefill2:8000", None))
    assert (configs[1].prefill_policy, configs[1].decode_policy) == ("cache_aware", "cache_aware")
    assert [p for _, p in configs[2].prefill_urls] == [9000, None, None]
    assert (configs[3].prefill_policy, configs[3].decode_policy) == ("cache_aware", "power_of_two")
    with pytest.raises(ConfigError, match="--epd-disaggregation is not supported by kvroute"):
        config_from_args(_parse(_argv(examples[4])), environ={})


@pytest.mark.parametrize("line", PEER_DOC_LINES)
async def test_doc_command_lines_start(line: str, tmp_path: Path, start_router: Any) -> None:
    """The router starts on each line (its workers are unreachable: it serves, not ready) and answers."""
    config = config_from_args(_parse(_argv(line.replace("LOGDIR", str(tmp_path)))), environ={})
    r = await start_router(config=replace(config, host="127.0.0.1", port=0, prometheus_port=0))
    async with r.session.get(r.url + "/liveness") as resp:
        assert resp.status == 200
    async with r.session.get(r.url + "/readiness") as resp:
        assert resp.status == 503


def test_service_discovery_lines_configure_discovery() -> None:
    argv = "--service-discovery --selector app=sglang-worker --service-discovery-port 8000"
    c = config_from_args(_parse(argv.split()), environ={})
    assert (c.selector, c.service_discovery_port) == ("app=sglang-worker", 8000)


@pytest.mark.parametrize("line", sorted(REFUSED_DOC_LINES))
def test_doc_command_lines_refused_with_the_reason(line: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_args(_parse(_argv(line)), environ={})
    assert str(err.value).startswith(REFUSED_DOC_LINES[line])
    assert "is not supported by kvroute: " in str(err.value)


def test_admission_flags_at_their_defaults_are_accepted() -> None:
    """A command line that spells out the peers' defaults (no limit) still starts."""
    argv = "--worker-urls http://w:1 --max-concurrent-requests -1 --queue-size 100 --queue-timeout-secs 60"
    config_from_args(_parse(argv.split()), environ={})
