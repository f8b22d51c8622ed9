"""The peer routers the comparison runs beside kvroute, pinned, each found or installed in its own venv.

A peer is SGLang's router as released in January (`sglang-router` 0.3.2, `python -m
sglang_router.launch_router`), its successor `smg` 1.13 (`smg launch`) and vLLM's fork `vllm-router`
0.1.17. Each is looked up first in its own venv under `bench/.peers/<name>/` (made by
`python -m kvroute.bench.peers install` or `kvroute bench --install-peers`: its dependencies never meet
kvroute's), then in the running interpreter's environment when the installed version is the pinned one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent / ".peers"


@dataclass(frozen=True)
class Peer:
    """`kind` names it in router specs (`KIND-POLICY`); `argv` runs it from a venv's bin folder."""

    kind: str
    package: str
    version: str
    argv: tuple[str, ...]  # program (in the venv's bin) and leading arguments
    policies: tuple[str, ...]  # the ones the comparison runs: those that fit a plain HTTP fleet

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"


PEERS: dict[str, Peer] = {
    "sglang": Peer(
        "sglang", "sglang-router", "0.3.2", ("python", "-m", "sglang_router.launch_router"),
        ("cache_aware", "round_robin"),
    ),
    "smg": Peer("smg", "smg", "1.13.0", ("smg", "launch"), ("cache_aware", "round_robin")),
    "vllm-router": Peer(
        "vllm-router", "vllm-router", "0.1.17", ("vllm-router",), ("cache_aware", "round_robin")
    ),
}  # fmt: skip


def _own_venv_bin(peer: Peer) -> Path:
    return PEERS_DIR / peer.kind / "bin"


def command(peer: Peer) -> list[str] | None:
    """The argv prefix that runs `peer` at its pinned version, or None when it is not installed."""
    own = _own_venv_bin(peer)
    if (own / peer.argv[0]).exists():
        return [str(own / peer.argv[0]), *peer.argv[1:]]
    try:
        if metadata.version(peer.package) != peer.version:
            return None
    except metadata.PackageNotFoundError:
        return None
    here = Path(sys.executable).parent
    exe = sys.executable if peer.argv[0] == "python" else str(here / peer.argv[0])
    return [exe, *peer.argv[1:]] if Path(exe).exists() else None


def install(peer: Peer) -> list[str]:
    """Create `bench/.peers/<kind>` and pip-install the pinned package there; returns its command."""
    venv = PEERS_DIR / peer.kind
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", peer.pin], check=True)
    cmd = command(peer)
    if cmd is None:
        raise RuntimeError(f"{peer.pin} installed in {venv} but {peer.argv[0]} is not there")
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvroute.bench.peers", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["list", "install"])
    ap.add_argument("kinds", nargs="*", default=list(PEERS))
    a = ap.parse_args(argv)
    for kind in a.kinds:
        peer = PEERS[kind]
        cmd = install(peer) if a.action == "install" else command(peer)
        print(f"{peer.pin}: {' '.join(cmd) if cmd else 'not installed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
