"""Discovery flags take sglang-router's / smg's shapes; inconsistent ones fail at start with one line."""

from __future__ import annotations

import pytest

from kvroute.router.cli import build_serve_parser, config_from_args
from kvroute.router.config import ConfigError, build_config
from kvroute.router.discovery.dns import DnsSource
from kvroute.router.discovery.file import FileSource
from kvroute.router.discovery.kubernetes import KubernetesSource
from kvroute.router.discovery.runner import build_source
from kvroute.router.types import WorkerRole


def parse(argv: str, environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return config_from_args(build_serve_parser().parse_args(argv.split()), environ=environ or {})


def test_sglang_router_service_discovery_flags() -> None:
    c = parse(
        "--service-discovery --selector app=sglang env=prod --service-discovery-port 8000 "
        "--service-discovery-namespace inference"
    )
    assert (c.discovery, c.selector, c.service_discovery_port) == ("kubernetes", "app=sglang,env=prod", 8000)
    src = build_source(c)
    assert isinstance(src, KubernetesSource) and src.namespace == "inference"
    assert src.selectors == [(WorkerRole.REGULAR, "app=sglang,env=prod")]
    pd = parse(
        "--pd-disaggregation --service-discovery --prefill-selector app=sglang role=prefill "
        "--decode-selector app=sglang role=decode --bootstrap-port-annotation example.com/bp"
    )
    src = build_source(pd)
    assert isinstance(src, KubernetesSource) and src.bootstrap_annotation == "example.com/bp"
    assert src.selectors == [
        (WorkerRole.PREFILL, "app=sglang,role=prefill"),
        (WorkerRole.DECODE, "app=sglang,role=decode"),
    ]
    # smg's spellings: --discovery-provider, one comma-separated selector string, env and file forms.
    c = parse("--discovery-provider kubernetes --selector app=sglang,tier=gpu")
    assert c.selector == "app=sglang,tier=gpu"
    c = build_config({}, environ={"KVROUTE_SERVICE_DISCOVERY": "true", "KVROUTE_SELECTOR": "app=x"})
    assert c.discovery == "kubernetes" and c.selector == "app=x"
    assert build_config({"selector": {"app": "y", "gpu": True}}, environ={}).selector == "app=y,gpu=true"


def test_file_and_dns_flags(tmp_path) -> None:
    c = parse(
        f"--discovery-provider file --discovery-file {tmp_path}/w.json --discovery-check-interval-secs 5"
    )
    src = build_source(c)
    assert isinstance(src, FileSource) and src.interval_s == 5 and src.path == tmp_path / "w.json"
    c = parse(
        "--discovery-provider dns --discovery-dns-name _http._tcp.sglang.inference.svc.cluster.local "
        "--discovery-dns-record SRV --discovery-dns-server 127.0.0.1:5353 --discovery-dns-grace-secs 60"
    )
    src = build_source(c)
    assert isinstance(src, DnsSource) and src.record == "SRV" and src.grace_s == 60
    assert src.names == [(WorkerRole.REGULAR, "_http._tcp.sglang.inference.svc.cluster.local")]
    assert src.resolver.nameservers == ["127.0.0.1"] and src.resolver.port == 5353


@pytest.mark.parametrize(
    "argv, message",
    [
        ("--service-discovery", "needs --selector"),
        ("--discovery-provider consul", "kubernetes, dns or file"),
        (
            "--service-discovery --discovery-provider file --discovery-file x",
            "give it or --discovery-provider",
        ),
        ("--discovery-provider file", "needs --discovery-file"),
        ("--discovery-provider dns", "needs --discovery-dns-name"),
        ("--service-discovery --prefill-selector a=b", "need --pd-disaggregation"),
        ("--discovery-provider dns --discovery-dns-name x --discovery-dns-record MX", "A or SRV"),
        ("--service-discovery --selector a=b --service-discovery-port 0", "out of range"),
    ],
)
def test_inconsistent_discovery_flags(argv: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(argv)
