"""Record the long flags of SGLang's router CLIs (sglang-router, smg) from their own argparse parsers.

Writes `tests/router/data/peer_flags.json`, the copy `tests/router/test_peer_flags.py` checks kvroute's
compatibility table against (and compares with the live parsers when those packages are installed).
Run after upgrading either peer: `python scripts/record_peer_flags.py`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PEERS = {"sglang-router": "sglang_router.router_args", "smg": "smg.router_args"}
OUT = Path(__file__).resolve().parent.parent / "tests" / "router" / "data" / "peer_flags.json"


def arity(action: argparse.Action) -> str:
    """'0' for a switch, '1' for one value, else argparse's nargs ('*', '+')."""
    if action.nargs == 0:
        return "0"
    if action.nargs is None:
        return "1"
    return str(action.nargs)


def peer_flags(package: str) -> dict[str, Any]:
    module = importlib.import_module(PEERS[package])
    parser = argparse.ArgumentParser(add_help=False)
    module.RouterArgs.add_cli_args(parser, use_router_prefix=False)
    flags: dict[str, Any] = {}
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        for flag in longs:
            default = action.default
            if not isinstance(default, int | float | str | bool | type(None)):
                default = repr(default)
            flags[flag] = {
                "arity": arity(action),
                "default": default,
                "choices": list(action.choices) if action.choices else None,
                "help": " ".join((action.help or "").split()),
            }
    return {"version": metadata.version(package), "flags": dict(sorted(flags.items()))}


def main() -> int:
    data = {name: peer_flags(name) for name in PEERS}
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    for name, d in data.items():
        print(f"{name} {d['version']}: {len(d['flags'])} long flags", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
