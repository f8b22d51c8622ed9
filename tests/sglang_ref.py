"""Loads SGLang's own `kv_events.py` (the reference publisher/structs) by path, for conformance tests.

The files come from `scripts/fetch_sglang.sh` (`~/.cache/kvroute/sglang/<version>/kv_events.py`, or
`$KVROUTE_SGLANG_CACHE/<version>/`). 0.5.23's file imports two sglang helpers (`get_parallel`,
`NetworkAddress`) used only by functions the tests never call: minimal stand-ins are placed in
`sys.modules` while the file executes and removed afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

VERSIONS = ("0.5.10.post1", "0.5.23")


def cache_dir() -> Path:
    return Path(os.environ.get("KVROUTE_SGLANG_CACHE") or Path.home() / ".cache" / "kvroute" / "sglang")


class _NetworkAddress:
    """Stand-in for sglang.srt.utils.network.NetworkAddress (host:port parsing only)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.is_ipv6 = ":" in host

    @classmethod
    def parse(cls, text: str) -> _NetworkAddress:
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            return cls(host, int(rest.lstrip(":")))
        host, _, port = text.rpartition(":")
        if not host or ":" in host:
            raise ValueError(f"bad address {text!r}")
        return cls(host, int(port))

    def to_tcp(self) -> str:
        return f"tcp://[{self.host}]:{self.port}" if self.is_ipv6 else f"tcp://{self.host}:{self.port}"


def _stubs() -> dict[str, types.ModuleType]:
    names = ["sglang", "sglang.srt", "sglang.srt.runtime_context"]
    names += ["sglang.srt.utils", "sglang.srt.utils.network"]
    mods = {n: types.ModuleType(n) for n in names}

    def get_parallel() -> Any:
        raise RuntimeError("not available outside an SGLang scheduler")

    mods["sglang.srt.runtime_context"].get_parallel = get_parallel  # type: ignore[attr-defined]
    mods["sglang.srt.utils.network"].NetworkAddress = _NetworkAddress  # type: ignore[attr-defined]
    return mods


def load_kv_events(version: str) -> types.ModuleType:
    """SGLang's kv_events module of `version`; skips the test when the file was not downloaded."""
    path = cache_dir() / version / "kv_events.py"
    if not path.is_file():
        pytest.skip(f"SGLang {version} kv_events.py not cached at {path}: run scripts/fetch_sglang.sh")
    name = f"_sglang_ref_kv_events_{version.replace('.', '_')}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    stubs = _stubs()
    saved = {n: sys.modules.get(n) for n in stubs}
    sys.modules.update(stubs)
    sys.modules[name] = module  # msgspec resolves the structs' annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old
    return module
