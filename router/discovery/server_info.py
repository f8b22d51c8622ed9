"""What a worker says about itself: `/server_info` + `/model_info` -> `Worker` fields, KV-event endpoint.

Pure functions (no I/O): the registry calls them once per registration. Field names follow SGLang
0.5.10 and 0.5.23 (`get_server_info` merges server args and scheduler info).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson

from cache_index.apply import page_size_problem as fold_problem
from router.types import Worker, WorkerRole

_WILDCARD_HOSTS = {"", "*", "0.0.0.0", "::", "[::]"}
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def apply_server_info(
    w: Worker, info: dict[str, Any], minfo: dict[str, Any], kv_override: str | None
) -> None:
    """Fill `w` (model, page size, role, bootstrap port, capacity, event endpoint) from the engine's info.

    A REGULAR worker whose engine runs in prefill/decode mode takes that role; `kv_override` (the
    operator's `--kv-events`) wins over the discovered endpoint.
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
    endpoint, replay, topic = discover_kv_events(w.url, info)
    if kv_override:
        endpoint, replay = kv_override, None
    w.kv_events_endpoint = endpoint
    w.kv_events_replay_endpoint = replay
    w.kv_events_topic = topic


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
    dial). Only rank 0 of a data-parallel engine is returned.
    """
    host = urlsplit(url).hostname or "127.0.0.1"
    kv = info.get("kv_events")
    if isinstance(kv, dict) and isinstance(kv.get("endpoint_port_base"), int):
        h = str(kv.get("endpoint_host") or "")
        h = host if h in _WILDCARD_HOSTS else h
        endpoint = f"tcp://{h}:{kv['endpoint_port_base']}"
        rp = kv.get("replay_endpoint_port_base")
        replay = f"tcp://{h}:{rp}" if isinstance(rp, int) else None
        return endpoint, replay, str(kv.get("topic") or "")
    sources = info.get("kv_event_sources")
    source = kv if isinstance(kv, dict) and isinstance(kv.get("endpoint"), str) else None
    if source is None and isinstance(sources, list):
        ranked = [s for s in sources if isinstance(s, dict) and isinstance(s.get("endpoint"), str)]
        ranked.sort(key=lambda s: s.get("dp_rank") or 0)
        source = ranked[0] if ranked else None
    cfg: Any = source
    if cfg is None:
        cfg = info.get("kv_events_config")
        if isinstance(cfg, str) and cfg.strip():
            try:
                cfg = orjson.loads(cfg)
            except orjson.JSONDecodeError:
                return None, None, ""
    if isinstance(cfg, dict) and isinstance(cfg.get("endpoint"), str):
        replay = cfg.get("replay_endpoint")
        return (
            _dialable(cfg["endpoint"], host),
            _dialable(replay, host) if isinstance(replay, str) else None,
            str(cfg.get("topic") or ""),
        )
    return None, None, ""


def _dialable(endpoint: str, host: str) -> str:
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme != "tcp":
        return endpoint
    h, _, port = rest.rpartition(":")
    if h in _WILDCARD_HOSTS or (h in _LOOPBACK_HOSTS and host not in _LOOPBACK_HOSTS):
        h = host
    return f"tcp://{h}:{port}"
