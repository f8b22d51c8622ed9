"""The policy table and the params -> config factory: every policy builds, bad params say why."""

from __future__ import annotations

import pytest

from kvroute.router.policies import POLICIES, PolicyContext, make_policy
from tests.router.policies.util import FakeOverlap

CTX = PolicyContext(kv_index=FakeOverlap(), inflight=FakeOverlap())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_builds_with_defaults(name: str) -> None:
    p = make_policy(name, {}, CTX)
    assert p.name == name  # the table's key is the policy's own name


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("nope", {}, "unknown policy 'nope'"),  # names the bad policy
        ("least_load", {"metrik": "blocks"}, "unknown parameter(s) metrik"),  # typo caught
        ("least_load", {"metric": "tokens"}, "metric"),  # not one of the literal values
        ("kv_aware", {"temperature": "0.5"}, "'temperature' must be float"),  # no string parsing
        ("kv_aware", {"decode_weight": True}, "'decode_weight' must be float"),  # bool is not a number
        ("kv_aware", {"temperature": -1.0}, "temperature must be finite and >= 0"),  # range check
        ("kv_aware", {"seed": 1.5}, "'seed' must be int or null"),  # float is not an int
        ("cache_aware", {"balance_abs_threshold": 6.4}, "must be int"),  # float is not an int
        ("cache_aware", {"balance_rel_threshold": 0.5}, "balance_rel_threshold must be >= 1"),
        ("consistent_hash", {"virtual_nodes": 0}, "virtual_nodes must be >= 1"),
        ("round_robin", {"anything": 1}, "known: none"),  # a policy without params says so
        ("random", [1, 2], "params must be an object"),
    ],
)
def test_bad_params_raise_value_error(name: str, params: object, message: str) -> None:
    with pytest.raises(ValueError) as err:
        make_policy(name, params, CTX)  # type: ignore[arg-type]
    assert message in str(err.value)


def test_int_is_accepted_for_float_and_stored_as_float() -> None:
    p = make_policy("kv_aware", {"decode_weight": 2, "seed": 7}, CTX)
    assert p.config.decode_weight == 2.0 and isinstance(p.config.decode_weight, float)  # type: ignore[attr-defined]
    assert p.config.seed == 7  # type: ignore[attr-defined]


def test_kv_aware_without_index_is_refused() -> None:
    with pytest.raises(ValueError, match="needs the router's KV index"):
        make_policy("kv_aware", {})


def test_configs_are_frozen() -> None:
    p = make_policy("cache_aware", {"cache_threshold": 0.5}, CTX)
    with pytest.raises(AttributeError):
        p.config.cache_threshold = 0.1  # type: ignore[attr-defined, misc]
