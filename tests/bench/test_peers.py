"""The peer routers of the comparison: names, pinned versions and the commands that start them."""

from __future__ import annotations

import pytest

from kvroute.bench.compare import BenchError, RouterSpec, default_routers, router_command
from kvroute.bench.peers import PEERS, command


@pytest.mark.parametrize(
    ("text", "kind", "policy", "params"),
    [
        ("kvroute-kv_aware:reuse_weight=2", "kvroute", "kv_aware", ("reuse_weight=2",)),
        ("smg-cache_aware", "smg", "cache_aware", ()),
        ("vllm-router-round_robin", "vllm-router", "round_robin", ()),  # the longest kind wins
        ("sglang-cache_aware:cache-threshold=0.5", "sglang", "cache_aware", ("cache-threshold=0.5",)),
    ],
)
def test_router_specs_parse(text: str, kind: str, policy: str, params: tuple[str, ...]) -> None:
    spec = RouterSpec.parse(text)
    assert (spec.kind, spec.policy, spec.params) == (kind, policy, params)
    assert spec.name == text


@pytest.mark.parametrize("text", ["vllm-cache_aware", "smg-", "nginx-round_robin", "smg-cache_aware:x"])
def test_bad_router_specs_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="bad router"):
        RouterSpec.parse(text)


def test_every_peer_is_pinned_and_runs_two_policies_by_default() -> None:
    assert {k: p.pin for k, p in PEERS.items()} == {
        "sglang": "sglang-router==0.3.2",
        "smg": "smg==1.13.0",
        "vllm-router": "vllm-router==0.1.17",
    }
    names = [s.name for s in default_routers()]
    assert names[:4] == [f"kvroute-{p}" for p in ("round_robin", "least_load", "cache_aware", "kv_aware")]
    assert {"smg-cache_aware", "smg-round_robin", "vllm-router-cache_aware", "sglang-round_robin"} <= {*names}
    assert [s.name for s in default_routers(False)] == names[:4]


@pytest.mark.parametrize("kind", list(PEERS))
def test_peer_command_names_the_fleet_and_policy(kind: str) -> None:
    spec = RouterSpec(kind, "cache_aware")
    if command(PEERS[kind]) is None:
        with pytest.raises(BenchError, match="not installed"):
            router_command(spec, ["http://127.0.0.1:1"], 4321, 64)
        return
    cmd = router_command(spec, ["http://127.0.0.1:1", "http://127.0.0.1:2"], 4321, 64)
    i = cmd.index("--worker-urls")
    assert cmd[i + 1 : i + 3] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert cmd[cmd.index("--policy") + 1] == "cache_aware" and cmd[cmd.index("--port") + 1] == "4321"
    if kind == "smg":  # its event-driven index counts in blocks of the fleet's page size
        assert cmd[1] == "launch" and cmd[cmd.index("--block-size") + 1] == "64"
