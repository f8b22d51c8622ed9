"""Launcher: N GPU engines in one process (one device, shared weights, separate KV pools), each served by
SGLang's HTTP API on its own port and publishing KV events on its own ZeroMQ endpoint.

    kvroute engine --device cuda --model-config llama3-8b --port 30001 --num-engines 4

Engine i listens on ``port + i`` and publishes on ``tcp://HOST:(events_port + i)`` (``--events-port 0``:
ephemeral ports, reported in /server_info and on stdout). Once every engine serves, one JSON line
``{"engines": [{"url": ..., "kv_events": ..., "role": ..., "bootstrap_port": ...}, ...]}`` is printed.

PD disaggregation: ``--roles prefill,prefill,decode,decode`` gives engine i its SGLang
``--disaggregation-mode``; prefill engine i serves its bootstrap port on ``bootstrap_port + i`` (0:
ephemeral). Engines of one process copy KV device to device; a decode engine in another process on the
same GPU opens the prefill pool's CUDA IPC handles (``kvroute.engines.gpu.transfer``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from kvroute.engines.gpu.config import EngineConfig, ModelConfig, load_model_config


@dataclass(frozen=True)
class LaunchArgs:
    model: ModelConfig
    engine: EngineConfig
    host: str
    port: int
    num_engines: int
    events_port: int | None
    events_form: str
    replay: bool
    roles: tuple[str, ...] = ()
    bootstrap_port: int = 0

    def role(self, i: int) -> str:
        return self.roles[i] if self.roles else self.engine.disaggregation_mode


def parse_args(argv: Sequence[str] | None) -> LaunchArgs:
    ap = argparse.ArgumentParser(prog="kvroute engine", description="kvroute's GPU engine (SGLang API)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--model-config", default="tiny", help="preset name, ModelConfig JSON or HF config.json")
    ap.add_argument(
        "--model-path", default=None, help="safetensors weights (HF Llama names); random if absent"
    )
    ap.add_argument("--dtype", default=None, help="override the config's dtype")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30001, help="engine i serves on port + i")
    ap.add_argument("--num-engines", type=int, default=1)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=0, help="KV pages per engine; 0 = from memory fraction")
    ap.add_argument(
        "--kv-memory-fraction",
        type=float,
        default=0.85,
        help="share of free device memory (after weights) for all engines' KV pools together",
    )
    ap.add_argument("--max-batch-tokens", type=int, default=8192, help="tokens per step (chunked prefill)")
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attention", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument(
        "--events-port",
        type=int,
        default=None,
        help="first KV-event PUB port (engine i: +i); 0 = ephemeral; absent = no events",
    )
    ap.add_argument("--events-form", default="array", choices=["array", "map"])
    ap.add_argument("--replay", action="store_true", help="also serve a replay ROUTER socket per engine")
    ap.add_argument("--served-model-name", default="kvroute-gpu")
    ap.add_argument(
        "--roles",
        default="",
        help="comma-separated disaggregation mode per engine (null, prefill, decode); sets --num-engines",
    )
    ap.add_argument("--bootstrap-port", type=int, default=0, help="prefill engine i: +i; 0 = ephemeral")
    ap.add_argument("--bootstrap-timeout", type=float, default=30.0, help="PD decode wait for its room (s)")
    a = ap.parse_args(argv)
    roles = tuple(r.strip() for r in a.roles.split(",") if r.strip())
    if roles:
        bad = sorted(set(roles) - {"null", "prefill", "decode"})
        if bad:
            ap.error(f"--roles: unknown modes {bad} (null, prefill, decode)")
        a.num_engines = len(roles)
    model = load_model_config(a.model_config)
    if a.dtype:
        model = model.with_dtype(a.dtype)
    if a.num_engines < 1:
        ap.error("--num-engines must be >= 1")
    eng = EngineConfig(
        page_size=a.page_size,
        num_pages=a.num_pages,
        kv_memory_fraction=a.kv_memory_fraction,
        max_batch_tokens=a.max_batch_tokens,
        max_running=a.max_running,
        seed=a.seed,
        device=a.device,
        attention=a.attention,
        model_path=a.model_path,
        served_model_name=a.served_model_name,
        bootstrap_timeout_s=a.bootstrap_timeout,
    )
    return LaunchArgs(
        model,
        eng,
        a.host,
        a.port,
        a.num_engines,
        a.events_port,
        a.events_form,
        a.replay,
        roles,
        a.bootstrap_port,
    )


def pages_per_engine(args: LaunchArgs) -> int:
    """Split the free device memory (weights already resident) between the engines' pools."""
    if args.engine.num_pages > 0:
        return args.engine.num_pages
    import torch

    from kvroute.engines.gpu.engine import DEFAULT_CPU_PAGES
    from kvroute.engines.gpu.kv_pool import KVPool
    from kvroute.engines.gpu.model import torch_dtype

    dev = torch.device(args.engine.device)
    if dev.type != "cuda":
        return DEFAULT_CPU_PAGES
    free, _ = torch.cuda.mem_get_info(dev)
    # Keep room for activations of the largest step: logits (vocab x rows) and MLP intermediates.
    m = args.model
    reserve = 4 * args.engine.max_batch_tokens * (m.intermediate_size * 2 + m.hidden_size * 4)
    reserve = reserve * args.num_engines + (2 << 30)
    budget = max(0, int(free * args.engine.kv_memory_fraction) - reserve)
    return KVPool.pages_for_bytes(
        args.model, args.engine.page_size, budget // args.num_engines, torch_dtype(args.model.dtype).itemsize
    )


async def serve(
    args: LaunchArgs, stop: asyncio.Event, ready: asyncio.Future[list[dict[str, str]]] | None = None
) -> list[dict[str, str]]:
    """Start every engine and its HTTP site, run until ``stop``; ``ready`` gets their addresses once all
    serve (the same list is printed as one JSON line on stdout)."""
    from aiohttp import web

    from kvroute.engines.gpu.engine import GpuEngine
    from kvroute.engines.gpu.model import LlamaWeights
    from kvroute.engines.gpu.transfer import PoolDirectory
    from kvroute.engines.http_api import create_app

    dev = args.engine.device
    ec = args.engine
    if ec.model_path:
        weights = await asyncio.to_thread(LlamaWeights.from_safetensors, args.model, ec.model_path, dev)
    else:
        weights = await asyncio.to_thread(LlamaWeights.random, args.model, dev, ec.seed)
    pages = await asyncio.to_thread(pages_per_engine, args)
    pools = PoolDirectory()  # engines of this process copy KV from each other's pools directly
    runners: list[web.AppRunner] = []
    engines: list[GpuEngine] = []
    info: list[dict[str, str]] = []
    try:
        for i in range(args.num_engines):
            ev = None
            replay = None
            if args.events_port is not None:
                p = 0 if args.events_port == 0 else args.events_port + i
                ev = f"tcp://{args.host}:{p}"
                if args.replay:
                    replay = f"tcp://{args.host}:{0 if args.events_port == 0 else args.events_port + 100 + i}"
            role = args.role(i)
            bport = 0 if args.bootstrap_port == 0 else args.bootstrap_port + i
            eng = GpuEngine(
                args.model,
                dataclasses.replace(ec, disaggregation_mode=role),
                weights=weights,
                kv_events_endpoint=ev,
                kv_events_replay=replay,
                kv_events_form=args.events_form,
                num_pages=pages,
                name=f"e{i}",
                pools=pools,
                bootstrap_host=args.host,
                bootstrap_port=bport,
            )
            engines.append(eng)
            await eng.start()
            app = create_app(eng, served_model_name=ec.served_model_name, manage_core=False)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, args.host, args.port + i if args.port else 0)
            await site.start()
            port = runner.addresses[0][1]
            kv = eng.facts.kv_events
            info.append(
                {
                    "url": f"http://{args.host}:{port}",
                    "kv_events": kv.endpoint if kv else "",
                    "pages": str(pages),
                    "role": role,
                    "bootstrap_port": str(eng.facts.disaggregation_bootstrap_port or ""),
                }
            )
        print(json.dumps({"engines": info}), flush=True)
        if ready is not None:
            ready.set_result(info)
        await stop.wait()
    finally:
        for r in runners:
            await r.cleanup()
        for e in engines:
            await e.close()
    return info


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(args, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
