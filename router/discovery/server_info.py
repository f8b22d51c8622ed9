"""What a worker says about itself: `/server_info` + `/model_info` -> `Worker` fields, KV-event endpoint.

Pure functions (no I/O): the registry calls them once per registration. Field names follow SGLang
0.5.10 and 0.5.23 (`get_server_info` merges server args and scheduler info).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import urlsplit

import orjson

from kvroute.cache_index.apply import page_size_problem as fold_problem
from kvroute.router.types import EventSource, Worker, WorkerRole

_WILDCARD_HOSTS = {"", "*", "0.0.0.0", "::", "[::]"}
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def apply_server_info(
    w: Worker,
    info: dict[str, Any],
    minfo: dict[str, Any],
    kv_override: str | None,
    socket_mode: str = "auto",
) -> None:
    """Fill `w` (model, page size, role, bootstrap port, capacity, event endpoints, DP size) from the
    engine's info.

    A REGULAR worker whose engine runs in prefill/decode mode takes that role; `kv_override` (the
    operator's `--kv-events`, optionally `bind:`/`connect:`-prefixed) wins over the discovered endpoint.
    `socket_mode`: `auto` (from the engine's configuration: bind when its publisher connects), or
    `connect` / `bind` for every discovered stream.
    """
    ps = info.get("page_size")
    w.page_size = int(ps) if isinstance(ps, int) else None
    w.model = (
        minfo.get("served_model_name")
        or info.get("served_model_name")
        or minfo.get("model_path")
        or info.get("model_path")
        or w.model
    )
    mode = minfo.get("disaggregation_mode") or info.get("disaggregation_mode")
    if mode in ("prefill", "decode") and w.role is WorkerRole.REGULAR:
        w.role = WorkerRole(mode)
    bp = info.get("disaggregation_bootstrap_port")
    if isinstance(bp, int):
        w.bootstrap_port = bp
    mtt = info.get("max_total_num_tokens", info.get("max_total_tokens"))
    if isinstance(mtt, int):
        w.max_total_tokens = mtt
    dp = info.get("dp_size")
    w.dp_size = dp if isinstance(dp, int) and not isinstance(dp, bool) and dp > 0 else 1
    w.dp_rank_field = (
        "routed_dp_rank" if _version_at_least(info.get("version"), (0, 5, 10)) else "data_parallel_rank"
    )
    sources = event_sources(w.url, info)
    if socket_mode in ("bind", "connect"):
        sources = [dataclasses.replace(src, bind=socket_mode == "bind") for src in sources]
    if kv_override:
        bind, endpoint = split_socket_mode(kv_override)
        topic = sources[0].topic if sources else ""
        sources = [EventSource(0, endpoint, None, topic, bind if bind is not None else socket_mode == "bind")]
    w.kv_event_sources = tuple(sources)
    first = sources[0] if sources else None
    w.kv_events_endpoint = first.endpoint if first else None
    w.kv_events_replay_endpoint = first.replay_endpoint if first else None
    w.kv_events_topic = first.topic if first else ""
    w.kv_events_bind = first.bind if first else False


def split_socket_mode(endpoint: str) -> tuple[bool | None, str]:
    """`bind:tcp://...` -> (True, endpoint); `connect:tcp://...` -> (False, endpoint); else (None, as is)."""
    for prefix, bind in (("bind:", True), ("connect:", False)):
        if endpoint.startswith(prefix):
            return bind, endpoint[len(prefix) :]
    return None, endpoint


def publisher_binds(endpoint: str, bind: Any = None, version: Any = None) -> bool:
    """SGLang's rule (`ZmqEventPublisher._socket_setup`): an explicit `bind` setting (0.5.23's config key)
    wins; else its PUB binds a wildcard (`*`, `::`; `0.0.0.0` too from 0.5.23 on), `ipc://` or
    `inproc://` endpoint and connects to any other (a concrete address: the subscriber's)."""
    if isinstance(bind, bool):
        return bind
    if "0.0.0.0" in endpoint and not _version_at_least(version, (0, 5, 11)):
        return False  # 0.5.10 and older connect to 0.0.0.0
    return (
        "*" in endpoint
        or "::" in endpoint
        or "0.0.0.0" in endpoint
        or endpoint.startswith(("ipc://", "inproc://"))
    )


def offset_endpoint(endpoint: str, rank: int) -> str:
    """Rank `rank`'s endpoint, as SGLang derives it: tcp port + rank, `inproc://x_dpN`, ipc unchanged."""
    if rank == 0:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{rank}"
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        if port.isdigit():
            return f"{base}:{int(port) + rank}"
    return endpoint


def event_sources(url: str, info: dict[str, Any]) -> list[EventSource]:
    """Every KV-event stream the engine publishes, rank by rank, in the forms SGLang versions report:
    0.5.23's `kv_events` descriptor (port base + rank for `dp_size` ranks) and `kv_event_sources` list
    (connect: the publisher bound them); else the `kv_events_config` server arg, with one publisher per
    rank under DP attention (SGLang offsets the ports by the rank) and the socket direction of SGLang's
    rule: a wildcard endpoint is bound by the engine (the router connects, to the worker's host), a
    concrete one is connected to by the engine (the router binds it, as given)."""
    host = urlsplit(url).hostname or "127.0.0.1"
    connecting = _connecting_sources(host, info)
    if connecting:
        return connecting
    kv = info.get("kv_events")
    if isinstance(kv, dict) and isinstance(kv.get("endpoint_port_base"), int):
        h = str(kv.get("endpoint_host") or "")
        h = host if h in _WILDCARD_HOSTS else h
        dp_kv = kv.get("dp_size")
        n = dp_kv if isinstance(dp_kv, int) and dp_kv > 0 else 1
        rp = kv.get("replay_endpoint_port_base")
        topic = str(kv.get("topic") or "")
        return [
            EventSource(
                r,
                f"tcp://{h}:{kv['endpoint_port_base'] + r}",
                f"tcp://{h}:{rp + r}" if isinstance(rp, int) else None,
                topic,
            )
            for r in range(n)
        ]
    listed = info.get("kv_event_sources")
    one = kv if isinstance(kv, dict) and isinstance(kv.get("endpoint"), str) else None
    entries = [one] if one is not None else listed if isinstance(listed, list) else []
    ranked = [s for s in entries if isinstance(s, dict) and isinstance(s.get("endpoint"), str)]
    if ranked:
        out = []
        for s in sorted(ranked, key=lambda s: s.get("dp_rank") or 0):
            replay = s.get("replay_endpoint")
            out.append(
                EventSource(
                    int(s.get("dp_rank") or 0),
                    _dialable(s["endpoint"], host),
                    _dialable(replay, host) if isinstance(replay, str) else None,
                    str(s.get("topic") or ""),
                )
            )
        return out
    cfg = _kv_events_config(info)
    if cfg is None:
        return []
    ranks = _dp_publishers(info)
    endpoint, replay = cfg["endpoint"], cfg.get("replay_endpoint")
    bind = not publisher_binds(endpoint, cfg.get("bind"), info.get("version"))
    out = []
    for r in range(ranks):
        ep = offset_endpoint(endpoint, r)
        rep = offset_endpoint(replay, r) if isinstance(replay, str) else None
        out.append(
            EventSource(
                r,
                ep if bind else _dialable(ep, host),
                _dialable(rep, host) if rep else None,  # the replay ROUTER always binds
                str(cfg.get("topic") or ""),
                bind,
            )
        )
    return out


def _kv_events_config(info: dict[str, Any]) -> dict[str, Any] | None:
    """The `--kv-events-config` server argument, parsed (None when absent or unreadable)."""
    cfg = info.get("kv_events_config")
    if isinstance(cfg, str) and cfg.strip():
        try:
            cfg = orjson.loads(cfg)
        except orjson.JSONDecodeError:
            return None
    return cfg if isinstance(cfg, dict) and isinstance(cfg.get("endpoint"), str) else None


def _dp_publishers(info: dict[str, Any]) -> int:
    """Publishers SGLang starts: one per rank under DP attention (`attn_dp_rank`), else one; 0.5.23's
    `kv_event_sources` list counts them directly."""
    listed = info.get("kv_event_sources")
    if isinstance(listed, list) and len(listed) > 1:
        return len(listed)
    dp = info.get("dp_size")
    return dp if info.get("enable_dp_attention") and isinstance(dp, int) and dp > 1 else 1


def _connecting_sources(host: str, info: dict[str, Any]) -> list[EventSource]:
    """When the configured endpoint names a concrete address, SGLang's publisher connects to it (every
    other form describes where it bound): the router binds it, rank r at the port + r, as configured."""
    cfg = _kv_events_config(info)
    if cfg is None or publisher_binds(cfg["endpoint"], cfg.get("bind"), info.get("version")):
        return []
    replay = cfg.get("replay_endpoint")
    out = []
    for r in range(_dp_publishers(info)):
        rep = offset_endpoint(replay, r) if isinstance(replay, str) else None
        out.append(
            EventSource(
                r,
                offset_endpoint(cfg["endpoint"], r),
                _dialable(rep, host) if rep else None,  # the replay ROUTER always binds
                str(cfg.get("topic") or ""),
                True,
            )
        )
    return out


def _version_at_least(version: Any, least: tuple[int, ...]) -> bool:
    """SGLang's `version` string (`0.5.10.post1`) >= `least`; unknown versions count as new."""
    if not isinstance(version, str):
        return True
    parts: list[int] = []
    for p in version.split("."):
        digits = "".join(ch for ch in p if ch.isdigit()) if p[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) >= least if parts else True


def page_size_problem(w: Worker, info: dict[str, Any], block_size: int) -> str | None:
    """Why `w` must be rejected for this router's block size (a silent mismatch breaks KV routing):
    its pages must fold into router blocks (the block size a multiple of the page size)."""
    if w.page_size is not None and (problem := fold_problem(w.page_size, block_size)):
        return problem
    kv = info.get("kv_events")
    if isinstance(kv, dict) and isinstance(kv.get("block_size"), int):
        return fold_problem(kv["block_size"], block_size)
    return None


def discover_kv_events(url: str, info: dict[str, Any]) -> tuple[str | None, str | None, str]:
    """Event endpoint from `/server_info`, in the forms SGLang versions report it:
    0.5.23's `kv_events` descriptor (`endpoint_host` + `endpoint_port_base`), a source dict with an
    `endpoint` (`kv_events` or the `kv_event_sources` list), else the `kv_events_config` server arg.

    Wildcard or loopback hosts are replaced by the worker URL's host (the address the router can
    dial), except for an endpoint the engine connects to (it is the router's to bind). Only rank 0 of a
    data-parallel engine is returned (`event_sources` gives every rank).
    """
    sources = event_sources(url, info)
    if sources:
        return sources[0].endpoint, sources[0].replay_endpoint, sources[0].topic
    return None, None, ""


def _dialable(endpoint: str, host: str) -> str:
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme != "tcp":
        return endpoint
    h, _, port = rest.rpartition(":")
    if h in _WILDCARD_HOSTS or (h in _LOOPBACK_HOSTS and host not in _LOOPBACK_HOSTS):
        h = host
    return f"tcp://{h}:{port}"
