"""RouterConfig: precedence CLI > env > file > defaults, typing and validation."""

from __future__ import annotations

import json

import pytest

from kvroute.router.config import ConfigError, RouterConfig, build_config


def test_defaults() -> None:
    c = build_config({}, environ={})
    assert c == RouterConfig()
    assert (c.host, c.block_size, c.policy) == ("127.0.0.1", 16, "kv_aware")


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_precedence_cli_env_file(tmp_path, suffix) -> None:
    path = tmp_path / f"kvroute{suffix}"
    if suffix == ".toml":
        path.write_text(
            'port = 1111\nblock-size = 32\npolicy = "random"\nworker_urls = ["http://a:1"]\n'
            "policy_params = {overlap_weight = 2.5}\n"
        )
    elif suffix == ".yaml":
        path.write_text(
            "port: 1111\nblock-size: 32\npolicy: random\nworker_urls: [http://a:1]\n"
            "policy_params: {overlap_weight: 2.5}\n"
        )
    else:
        path.write_text(
            json.dumps(
                {
                    "port": 1111,
                    "block-size": 32,
                    "policy": "random",
                    "worker_urls": ["http://a:1"],
                    "policy_params": {"overlap_weight": 2.5},
                }
            )
        )
    env = {"KVROUTE_PORT": "2222", "KVROUTE_POLICY": "least_load", "KVROUTE_ADMIN_TOKEN": "t", "OTHER": "x"}
    c = build_config({"port": 3333, "config": str(path), "host": None}, environ=env)
    assert c.port == 3333  # CLI beats env and file
    assert c.policy == "least_load"  # env beats file
    assert c.block_size == 32  # file beats default
    assert c.host == "127.0.0.1"  # None on the CLI means "not given"
    assert c.admin_token == "t" and c.worker_urls == ("http://a:1",)
    assert c.policy_params_dict == {"overlap_weight": 2.5}


def test_env_lists_and_pairs() -> None:
    env = {
        "KVROUTE_WORKER_URLS": "http://a:1/, http://b:2",
        "KVROUTE_KV_EVENTS": "http://a:1=tcp://a:5557",
        "KVROUTE_POLICY_PARAMS": "temperature=0.5,balance_guard=true,name=x",
        "KVROUTE_MAX_RETRIES": "0",
    }
    c = build_config({}, environ=env)
    assert c.worker_urls == ("http://a:1", "http://b:2")
    assert c.kv_events_dict == {"http://a:1": "tcp://a:5557"}
    assert c.policy_params_dict == {"temperature": 0.5, "balance_guard": True, "name": "x"}
    assert c.max_retries == 0


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"port": "abc"}, "port: expected int"),
        ({"block_size": 0}, "block_size must be positive"),
        ({"max_retries": -1}, "max_retries must be >= 0"),
        ({"connect_timeout_s": -1}, "connect_timeout_s must be >= 0"),
        ({"worker_urls": ["localhost:3000"]}, "must start with http"),
        ({"kv_events": ["http://a:1"]}, r"WORKER_URL=\[bind:\|connect:\]tcp://"),
        ({"policy_params": ["novalue"]}, "KEY=VALUE"),
        ({"bogus": 1}, "unknown configuration key"),
    ],
)
def test_invalid_values(cli, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(cli, environ={})


def test_bad_file(tmp_path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("port = [")
    with pytest.raises(ConfigError, match="cannot parse"):
        build_config({"config": str(p)}, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        build_config({"config": str(tmp_path / "missing.toml")}, environ={})


def test_cli_flags_and_sglang_aliases() -> None:
    from kvroute.router.cli import build_serve_parser, config_from_args

    args = build_serve_parser().parse_args(
        [
            "--worker-urls",
            "http://a:1",
            "http://b:2",
            "--policy",
            "cache_aware",
            "--port",
            "0",
            "--max-payload-size",
            "1000",
            "--retry-max-retries",
            "4",
            "--cb-failure-threshold",
            "7",
            "--policy-param",
            "balance_abs_threshold=32",
            "--kv-events",
            "http://a:1=tcp://a:5557",
            "--disable-health-check",
        ]
    )
    c = config_from_args(args, environ={"KVROUTE_PORT": "9", "KVROUTE_BLOCK_SIZE": "64"})
    assert c.worker_urls == ("http://a:1", "http://b:2") and c.policy == "cache_aware"
    # --retry-max-retries counts all attempts (SGLang): 4 attempts = 3 retries
    assert (c.port, c.block_size, c.max_body_bytes, c.max_retries) == (0, 64, 1000, 3)
    assert (c.circuit_failure_threshold, c.health_check_interval_s) == (7, 0)
    assert c.policy_params_dict == {"balance_abs_threshold": 32}
    assert c.kv_events_dict == {"http://a:1": "tcp://a:5557"}


def test_cli_dispatch(capsys) -> None:
    from kvroute.router.cli import COMMANDS, main

    assert {"serve", "sim", "demo"} <= set(COMMANDS)
    assert main(["nope"]) == 2 and "unknown command" in capsys.readouterr().err
    assert main(["serve", "--worker-urls", "ftp://x"]) == 2 and "http://" in capsys.readouterr().err


def test_pd_flags_in_sglang_router_shapes() -> None:
    from kvroute.router.cli import build_serve_parser, config_from_args

    argv = (
        "--pd-disaggregation --prefill http://p1:30001 9001 --prefill http://p2:30001 none "
        "--prefill http://p3:30001 --decode http://d1:30002 --decode http://d2:30002 "
        "--prefill-policy cache_aware --decode-policy power_of_two --pd-local-prefill-max-tokens 256"
    ).split()
    c = config_from_args(build_serve_parser().parse_args(argv), environ={})
    assert c.pd_disaggregation is True
    assert c.prefill_urls == (("http://p1:30001", 9001), ("http://p2:30001", None), ("http://p3:30001", None))
    assert c.decode_urls == ("http://d1:30002", "http://d2:30002")
    assert (c.prefill_policy, c.decode_policy, c.pd_local_prefill_max_tokens) == (
        "cache_aware",
        "power_of_two",
        256,
    )
    bad_port = build_serve_parser().parse_args("--pd-disaggregation --prefill http://p:1 x".split())
    with pytest.raises(ConfigError, match="bootstrap port"):
        config_from_args(bad_port, environ={})
    with pytest.raises(ConfigError, match="pd_disaggregation"):
        config_from_args(build_serve_parser().parse_args(["--decode", "http://d:1"]), environ={})


def test_pd_from_env_and_file(tmp_path) -> None:
    env = {
        "KVROUTE_PD_DISAGGREGATION": "true",
        "KVROUTE_PREFILL_URLS": "http://p:1 9001,http://q:2",
        "KVROUTE_DECODE_URLS": "http://d:1,http://d:2",
    }
    c = build_config({}, environ=env)
    assert c.pd_disaggregation and c.prefill_urls == (("http://p:1", 9001), ("http://q:2", None))
    assert c.decode_urls == ("http://d:1", "http://d:2")
    path = tmp_path / "pd.json"
    path.write_text(
        json.dumps(
            {
                "pd-disaggregation": True,
                "prefill_urls": [["http://p:1", 9001], {"url": "http://q:2", "bootstrap_port": None}],
                "decode_urls": ["http://d:1"],
            }
        )
    )
    c = build_config({"config": str(path)}, environ={})
    assert c.prefill_urls == (("http://p:1", 9001), ("http://q:2", None)) and c.decode_urls == ("http://d:1",)
    with pytest.raises(ConfigError, match="boolean"):
        build_config({}, environ={"KVROUTE_PD_DISAGGREGATION": "maybe"})


def test_yaml_without_pyyaml_is_a_clear_error(tmp_path, monkeypatch) -> None:
    import sys

    path = tmp_path / "c.yaml"
    path.write_text("port: 1\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    with pytest.raises(ConfigError, match="PyYAML"):
        build_config({"config": str(path)}, environ={})


def test_cli_dispatches_plan_bench_and_engine(capsys, monkeypatch) -> None:
    from kvroute.router.cli import COMMANDS, main

    assert {"bench", "plan", "engine"} <= set(COMMANDS)
    rc = main(["plan", "--request-rate", "2", "--prompt-tokens", "1000", "--output-tokens", "100", "--json"])
    assert rc == 0 and '"prefill_workers": 1' in capsys.readouterr().out

    import kvroute.engines.gpu.launch as launch

    def no_torch(argv: object) -> int:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(launch, "main", no_torch)
    assert main(["engine", "--help"]) == 2 and "needs PyTorch" in capsys.readouterr().err

    import kvroute.bench.compare  # noqa: F401 (loads the submodule)
    from kvroute import bench

    seen: list[list[str]] = []
    monkeypatch.setattr(bench.compare, "main", lambda argv: seen.append(list(argv)) or 0)
    assert main(["bench", "--quick"]) == 0 and seen == [["--quick"]]


def test_serve_reports_an_unknown_pd_policy(capsys) -> None:
    from kvroute.router.app import create_app

    with pytest.raises(ConfigError, match="PD policies"):
        create_app(RouterConfig(pd_disaggregation=True, decode_policy="nope"))


def test_replica_flags_env_and_validation() -> None:
    """Redis replica settings from flags and KVROUTE_* env; what the runtime would reject fails early."""
    from kvroute.router.cli import build_serve_parser, config_from_args
    from kvroute.router.shared import ReplicaConfig

    args = build_serve_parser().parse_args(
        ["--redis-url", "redis://r:6379/1", "--replica-id", "r1", "--sync-interval-s", "0.1",
         "--replica-ttl-s", "1.5", "--redis-key-prefix", "fleet-a", "--redis-share-records"]
    )  # fmt: skip
    c = config_from_args(args, environ={})
    assert (c.redis_url, c.replica_id, c.sync_interval_s, c.replica_ttl_s) == (
        "redis://r:6379/1",
        "r1",
        0.1,
        1.5,
    )
    assert c.redis_key_prefix == "fleet-a" and c.redis_share_records is True
    rc = ReplicaConfig.from_router_config(c)
    assert (rc.redis_url, rc.replica_id, rc.key_prefix, rc.share_records) == (
        "redis://r:6379/1",
        "r1",
        "fleet-a",
        True,
    )
    env = {
        "KVROUTE_REDIS_URL": "redis://e:1/0",
        "KVROUTE_REDIS_SHARE_RECORDS": "false",
        "KVROUTE_REPLICA_ID": "x",
    }
    e = build_config({}, environ=env)
    assert (e.redis_url, e.redis_share_records, e.replica_id) == ("redis://e:1/0", False, "x")
    assert build_config({}, environ={}).redis_url is None  # default: a single replica, no Redis
    for bad, msg in (
        ({"sync_interval_s": 2, "replica_ttl_s": 2}, "must exceed"),
        ({"sync_interval_s": 0}, "sync_interval_s must be > 0"),
        ({"redis_url": "http://r:6379"}, "redis://"),
        ({"redis_key_prefix": ""}, "must not be empty"),
    ):
        with pytest.raises(ConfigError, match=msg):
            build_config(bad, environ={})
