"""SimFleet: N simulated SGLang servers in one event loop, one port each; and the `kvroute sim` command.

    async with SimFleet(workers=4, time_scale=0.01) as fleet:
        fleet.urls, fleet.event_endpoints, fleet.engines   # what tests and benches use

`python -m kvroute.engines.sim.fleet --workers 4 --base-port 30000` prints each server's URL and event
endpoints, then serves until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvroute.engines.sim.dp import DpSimEngine
from kvroute.engines.sim.engine import DisaggMode, SimConfig, SimEngine
from kvroute.engines.sim.faults import FaultConfig
from kvroute.engines.sim.pd import BootstrapRegistry
from kvroute.engines.sim.profiles import PROFILES, GpuProfile, get_profile
from kvroute.engines.sim.schedule_policy import SCHEDULE_POLICIES, SchedulePolicyName
from kvroute.engines.sim.server import SimServer


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free now (used only for numbers nothing listens on, e.g. bootstrap ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class WorkerInfo:
    """What a router needs to know about one fleet member."""

    index: int
    role: DisaggMode
    url: str
    event_endpoint: str | None
    replay_endpoint: str | None
    bootstrap_port: int | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SimFleet:
    """Async context manager running regular, prefill and decode simulated servers in one loop.

    Ports: `base_port` 0 gives each server a free port; else server i listens on base_port + i.
    Event endpoints: a free port each unless `event_base_port` is given (then +2i PUB, +2i+1 replay).
    PD engines share one `BootstrapRegistry`, so prefill/decode pairing works inside this fleet.
    `add` and `remove` grow and shrink it while it runs (`empty_ok`: it may start with no engine).
    """

    def __init__(
        self,
        workers: int = 1,
        *,
        prefill: int = 0,
        decode: int = 0,
        profile: str | GpuProfile = "tiny",
        host: str = "127.0.0.1",
        base_port: int = 0,
        event_base_port: int | None = None,
        time_scale: float = 1.0,
        page_size: int = 16,
        kv_capacity_tokens: int | None = None,
        event_form: Literal["array", "map"] = "array",
        event_topic: str = "",
        kv_events: bool = True,
        faults: FaultConfig | None = None,
        seed: int = 0,
        bootstrap_timeout_s: float = 30.0,
        model_path: str = "sim/llama3-8b",
        max_running_requests: int | None = None,
        chunked_prefill_size: int | None = None,
        schedule_policy: SchedulePolicyName = "fcfs",
        empty_ok: bool = False,
        enable_priority_scheduling: bool = False,
        api_key: str | None = None,
        dp_size: int = 1,
        event_bind: bool | None = None,
    ) -> None:
        """`api_key`: each engine runs as SGLang with `--api-key` (Bearer auth except /health, /metrics)."""
        if workers < 0 or prefill < 0 or decode < 0 or (workers + prefill + decode == 0 and not empty_ok):
            raise ValueError("a fleet needs at least one engine")
        if (prefill == 0) != (decode == 0) and not empty_ok:
            raise ValueError("a PD fleet needs both --prefill and --decode engines")
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.host = host
        self.base_port = base_port
        self._api_key = api_key
        if dp_size < 1 or (dp_size > 1 and event_base_port is not None):
            raise ValueError("dp_size must be >= 1, and > 1 only with free event ports (no event_base_port)")
        self.dp_size = dp_size
        # Fixed event ports are bound by default; event_bind=False keeps SGLang's rule (a concrete
        # address makes the publisher connect: the router binds), None with free ports: SGLang's rule.
        self.event_bind = event_bind
        self.event_base_port = event_base_port
        self.registry = BootstrapRegistry()
        self._knobs: dict[str, Any] = dict(
            model_path=model_path,
            page_size=page_size,
            kv_capacity_tokens=kv_capacity_tokens,
            max_running_requests=max_running_requests,
            chunked_prefill_size=chunked_prefill_size,
            schedule_policy=schedule_policy,
            enable_priority_scheduling=enable_priority_scheduling,
            time_scale=time_scale,
            bootstrap_timeout_s=bootstrap_timeout_s,
            kv_events=kv_events,
            event_topic=event_topic,
            event_form=event_form,
        )
        self._faults = faults
        self._seed = seed
        self._created = 0  # servers ever built: seeds and fixed ports are never reused
        roles: list[DisaggMode] = []
        roles += ["null"] * workers
        roles += ["prefill"] * prefill
        roles += ["decode"] * decode
        self.roles: list[DisaggMode] = []
        self.servers: list[SimServer] = []
        for role in roles:
            self.servers.append(self._build(role))
            self.roles.append(role)

    def _build(self, role: DisaggMode, faults: FaultConfig | None = None) -> SimServer:
        """A new (not started) server of `role`; the i-th one built gets seed + i and the fixed ports' i."""
        i = self._created
        self._created += 1
        host = self.host
        ev, rep = f"tcp://{host}:*", f"tcp://{host}:*"
        if self.event_base_port is not None:
            ev, rep = (
                f"tcp://{host}:{self.event_base_port + 2 * i}",
                f"tcp://{host}:{self.event_base_port + 2 * i + 1}",
            )
        base = faults if faults is not None else self._faults
        cfg = SimConfig(
            **self._knobs,
            seed=self._seed + i,
            disaggregation_mode=role,
            bootstrap_port=free_port(host) if role == "prefill" else None,
            event_endpoint=ev,
            replay_endpoint=rep,
            # Fixed event ports (`kvroute sim --event-base-port`): the engines bind them (with SGLang's rule
            # a concrete address makes a publisher connect, and no event would arrive).
            event_bind=(True if self.event_base_port is not None else None)
            if self.event_bind is None
            else (self.event_bind or None),
            faults=dataclasses.replace(base) if base is not None else FaultConfig(),
        )
        registry = self.registry if role != "null" else None
        engine: SimEngine | DpSimEngine = (
            SimEngine(cfg, self.profile, registry=registry)
            if self.dp_size == 1
            else DpSimEngine(cfg, self.profile, self.dp_size, registry=registry)
        )
        return SimServer(engine, host, self.base_port + i if self.base_port else 0, api_key=self._api_key)

    async def add(self, role: DisaggMode, faults: FaultConfig | None = None) -> WorkerInfo:
        """Start one more engine of `role` while the fleet runs (the autoscaler's sim scaler); `faults`
        e.g. `slow_start_s` to model an engine's start-up time."""
        server = self._build(role, faults)
        await server.start()
        self.servers.append(server)
        self.roles.append(role)
        return self.workers()[-1]

    async def remove(self, url: str) -> None:
        """Stop the engine at `url` (requests still running on it are aborted: drain it first)."""
        for i, s in enumerate(self.servers):
            if s.url == url:
                del self.servers[i]
                del self.roles[i]
                await s.close()
                return
        raise ValueError(f"no engine at {url} in this fleet")

    async def start(self) -> None:
        try:
            for s in self.servers:
                await s.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for s in self.servers:
            with contextlib.suppress(Exception):
                await s.close()
        self.registry.close()  # rooms the closed engines left behind (and their timers)

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def engines(self) -> list[SimEngine | DpSimEngine]:
        return [s.engine for s in self.servers]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def _urls(self, role: DisaggMode) -> list[str]:
        return [s.url for s, r in zip(self.servers, self.roles, strict=True) if r == role]

    @property
    def regular_urls(self) -> list[str]:
        return self._urls("null")

    @property
    def prefill_urls(self) -> list[str]:
        return self._urls("prefill")

    @property
    def decode_urls(self) -> list[str]:
        return self._urls("decode")

    @property
    def event_endpoints(self) -> list[str | None]:
        return [s.engine.facts.kv_events.endpoint if s.engine.facts.kv_events else None for s in self.servers]

    def workers(self) -> list[WorkerInfo]:
        out = []
        for i, (s, role) in enumerate(zip(self.servers, self.roles, strict=True)):
            kv = s.engine.facts.kv_events
            out.append(
                WorkerInfo(
                    index=i,
                    role=role,
                    url=s.url,
                    event_endpoint=kv.endpoint if kv else None,
                    replay_endpoint=kv.replay_endpoint if kv else None,
                    bootstrap_port=s.engine.config.bootstrap_port,
                )
            )
        return out

    async def set_faults(self, index: int, **changes: Any) -> None:
        """Change one engine's faults at run time (the in-process twin of POST /sim/faults)."""
        server = self.servers[index]
        server.engine.set_faults(changes)
        if "refuse_connections" in changes:
            await server.set_refuse(bool(changes["refuse_connections"]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvroute sim", description="Run a fleet of simulated SGLang engines.")
    p.add_argument("--workers", type=int, default=None, help="regular engines (default 1, or 0 with PD)")
    p.add_argument("--prefill", type=int, default=0, help="PD prefill engines")
    p.add_argument("--decode", type=int, default=0, help="PD decode engines")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--base-port", type=int, default=30000, help="engine i listens on base+i; 0: free ports")
    p.add_argument("--event-base-port", type=int, default=None, help="PUB on base+2i, replay base+2i+1")
    p.add_argument(
        "--profile", default="h100-llama3-8b", help=f"{', '.join(PROFILES)} or a calibration .json"
    )
    p.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per simulated second")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-capacity-tokens", type=int, default=None)
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--chunked-prefill-size", type=int, default=None)
    p.add_argument(
        "--event-form", choices=["array", "map"], default="array", help="0.5.10 array / 0.5.23 map"
    )
    p.add_argument(
        "--schedule-policy", choices=SCHEDULE_POLICIES, default="fcfs", help="SGLang's; fcfs is its default"
    )
    p.add_argument(
        "--enable-priority-scheduling",
        action="store_true",
        help="SGLang's: admit waiting requests by their `priority` (larger first), then arrival",
    )
    p.add_argument("--event-topic", default="")
    p.add_argument("--no-kv-events", action="store_true")
    p.add_argument("--model-path", default="sim/llama3-8b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap-timeout", type=float, default=30.0, help="PD decode wait (simulated s)")
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--die-after-tokens", type=int, default=None)
    p.add_argument("--stall", action="store_true")
    p.add_argument("--slow-start", type=float, default=0.0, help="seconds /health answers 503")
    p.add_argument("--refuse-connections", action="store_true")
    p.add_argument(
        "--dp-size", type=int, default=1, help="data-parallel ranks per engine (SGLang's --dp-size)"
    )
    p.add_argument("--api-key", default=None, help="engines require 'Authorization: Bearer KEY' (SGLang's)")
    p.add_argument("--json", action="store_true", help="print one JSON object per engine")
    return p


def fleet_from_args(args: argparse.Namespace) -> SimFleet:
    workers = args.workers if args.workers is not None else (0 if args.prefill or args.decode else 1)
    faults = FaultConfig(
        error_rate=args.error_rate,
        die_after_tokens=args.die_after_tokens,
        stall=args.stall,
        slow_start_s=args.slow_start,
        refuse_connections=args.refuse_connections,
    )
    return SimFleet(
        workers,
        prefill=args.prefill,
        decode=args.decode,
        profile=args.profile,
        host=args.host,
        base_port=args.base_port,
        event_base_port=args.event_base_port,
        time_scale=args.time_scale,
        page_size=args.page_size,
        kv_capacity_tokens=args.kv_capacity_tokens,
        event_form=args.event_form,
        event_topic=args.event_topic,
        kv_events=not args.no_kv_events,
        faults=faults,
        seed=args.seed,
        bootstrap_timeout_s=args.bootstrap_timeout,
        model_path=args.model_path,
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size,
        schedule_policy=args.schedule_policy,
        enable_priority_scheduling=args.enable_priority_scheduling,
        api_key=args.api_key,
        dp_size=args.dp_size,
    )


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with fleet_from_args(args) as fleet:
        for w in fleet.workers():
            if args.json:
                print(json.dumps(w.as_dict()), flush=True)
            else:
                extra = f" bootstrap_port {w.bootstrap_port}" if w.bootstrap_port is not None else ""
                print(
                    f"{w.role if w.role != 'null' else 'worker'} {w.index} {w.url} "
                    f"events {w.event_endpoint} replay {w.replay_endpoint}{extra}",
                    flush=True,
                )
        print(
            f"# {len(fleet.servers)} simulated engines, profile {fleet.profile.name}; Ctrl-C stops",
            flush=True,
        )
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional on exotic platforms
        runner = asyncio.run
    try:
        runner(serve(args))
    except ValueError as exc:
        print(f"kvroute sim: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
