"""Open-loop load generator for SGLang's `/generate` and the OpenAI APIs, streaming, loopback only.

Open loop: request i is sent at its workload arrival time whatever happened to earlier requests (a
closed loop would slow down with the server and hide queueing). Per request it records TTFT,
inter-token latencies, end-to-end latency, output tokens, the engine's `cached_tokens` and the worker
that served it (`X-Kvroute-Worker`, when the router says). With a simulated fleet running `time_scale`
times real speed, arrivals are compressed by the same factor and every latency is reported in engine
time (wall / time_scale), so results read as GPU seconds.

    python -m kvroute.bench.loadgen --url http://127.0.0.1:30000 --workload mooncake --count 200 --out r.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import orjson

from kvroute.bench.workloads import Request, build
from kvroute.router.observability.phases import engine_timings

Api = Literal["generate", "completions", "chat"]
WORKER_HEADER = "X-Kvroute-Worker"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class LoadgenError(RuntimeError):
    """The load generator was misconfigured (e.g. a non-loopback target)."""


@dataclass(frozen=True)
class LoadgenConfig:
    """How to send a workload. Times in seconds; `time_scale` < 1 means a faster-than-real fleet."""

    base_url: str
    api: Api = "generate"
    input_ids: bool = False  # /generate: send `input_ids` (byte ids) instead of `text`
    time_scale: float = 1.0  # wall seconds per engine second (the simulated fleet's time_scale)
    max_concurrency: int = 1024  # requests in flight at most; later arrivals wait (recorded as lag)
    request_timeout_s: float = 600.0  # wall seconds per request, whole stream
    model: str = "default"
    label: str = ""  # copied into every result (e.g. the router's name)
    progress: bool = True  # tqdm bar on stderr
    headers: tuple[tuple[str, str], ...] = ()  # sent with every request (e.g. a tenant's API key)


@dataclass
class RequestResult:
    """One request's outcome. Latencies in engine seconds (wall / time_scale); None where not reached."""

    rid: str
    label: str
    ok: bool
    prompt_tokens: int
    scheduled_s: float  # arrival time in the workload
    start_lag_s: float = 0.0  # how late it was sent (concurrency bound or event-loop lag)
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    cached_tokens: int | None = None
    worker: str | None = None
    status: int | None = None
    error: str | None = None
    done_s: float | None = None  # completion time from the run start (engine seconds)
    engine_e2e_s: float | None = None  # the engine's own e2e_latency (meta_info), when it reports one
    engine_queue_s: float | None = None  # engine-reported queueing before prefill (meta_info; native API)
    engine_prefill_s: float | None = None  # engine-reported prefill time (meta_info; native API)
    retry_after: str | None = None  # the Retry-After header of a 429/503

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(line: str) -> RequestResult:
        return RequestResult(**json.loads(line))


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise LoadgenError(f"load generator targets loopback only, got host {host!r}")


def build_payload(req: Request, cfg: LoadgenConfig) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) for one request. `ignore_eos` makes the engine generate exactly `output_tokens`."""
    if cfg.api == "generate":
        body: dict[str, Any] = {
            "sampling_params": {"max_new_tokens": req.output_tokens, "ignore_eos": True, "temperature": 0.0},
            "stream": True,
            "rid": req.rid,
        }
        if cfg.input_ids:
            body["input_ids"] = req.token_ids()
        else:
            body["text"] = req.text
        return "/generate", body
    common = {
        "model": cfg.model,
        "max_tokens": req.output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.api == "completions":
        return "/v1/completions", {**common, "prompt": req.text}
    if req.messages is None:
        raise LoadgenError(f"request {req.rid} has no messages: the chat API needs the multiturn workload")
    return "/v1/chat/completions", {**common, "messages": list(req.messages)}


def _chunk_tokens(obj: dict[str, Any], api: Api, seen: int) -> tuple[int, int | None]:
    """(tokens in this chunk, cached_tokens if reported) from one SSE JSON object."""
    if api == "generate":
        meta = obj.get("meta_info") or {}
        total = meta.get("completion_tokens")
        if isinstance(total, int):
            return max(0, total - seen), meta.get("cached_tokens")
        return (1 if obj.get("text") or obj.get("output_ids") else 0), meta.get("cached_tokens")
    cached = None
    usage = obj.get("usage")
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
    n = 0
    for ch in obj.get("choices") or ():
        piece = ch.get("text") if api == "completions" else (ch.get("delta") or {}).get("content")
        if piece:
            n += 1
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int) and not n:
        # The final usage chunk: no new text, but it may correct the token count.
        return max(0, usage["completion_tokens"] - seen), cached
    return n, cached


async def send_one(
    session: aiohttp.ClientSession, req: Request, cfg: LoadgenConfig, t0: float, lag: float
) -> RequestResult:
    """Send one streaming request and time it (perf_counter, wall), converting to engine seconds."""
    scale = cfg.time_scale
    res = RequestResult(req.rid, cfg.label, False, req.prompt_tokens, req.arrival_s, start_lag_s=lag / scale)
    path, body = build_payload(req, cfg)
    start = time.perf_counter()
    last = start
    try:
        async with session.post(
            cfg.base_url.rstrip("/") + path,
            json=body,
            headers=dict(cfg.headers) or None,
            timeout=aiohttp.ClientTimeout(total=cfg.request_timeout_s),
        ) as resp:
            res.status = resp.status
            res.worker = resp.headers.get(WORKER_HEADER)
            res.retry_after = resp.headers.get("Retry-After")
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                obj = orjson.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"])[:200]
                    return res
                n, cached = _chunk_tokens(obj, cfg.api, res.output_tokens)
                meta = obj.get("meta_info")
                if meta:
                    e2e = meta.get("e2e_latency")
                    if isinstance(e2e, int | float):
                        res.engine_e2e_s = float(e2e)
                    queue, prefill = engine_timings(meta)  # SGLang's names (router.observability)
                    if queue is not None:
                        res.engine_queue_s = queue
                    if prefill is not None:
                        res.engine_prefill_s = prefill
                if cached is not None:
                    res.cached_tokens = int(cached)
                if n <= 0:
                    continue
                if res.ttft_s is None:
                    res.ttft_s = (now - start) / scale
                    n -= 1
                    res.output_tokens += 1
                if n > 0:
                    # A chunk carrying several tokens: spread its gap evenly over them.
                    gap = (now - last) / scale / n
                    res.itl_s.extend([gap] * n)
                    res.output_tokens += n
                last = now
        end = time.perf_counter()
        res.e2e_s = (end - start) / scale
        res.done_s = (end - t0) / scale
        res.ok = res.ttft_s is not None and res.error is None
        if not res.ok and res.error is None:
            res.error = "stream ended without a token"
    except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
    return res


async def run_load(
    requests: Sequence[Request], cfg: LoadgenConfig, out_path: str | Path | None = None
) -> list[RequestResult]:
    """Send `requests` open-loop at their arrival times; return (and write as JSON lines) the results."""
    _check_loopback(cfg.base_url)
    if cfg.time_scale <= 0:
        raise LoadgenError("time_scale must be positive")
    from tqdm import tqdm

    results: list[RequestResult] = []
    sem = asyncio.Semaphore(cfg.max_concurrency)
    out = open(out_path, "w", encoding="utf-8") if out_path else None  # noqa: SIM115 - closed in finally
    bar = tqdm(total=len(requests), desc=cfg.label or "requests", file=sys.stderr, disable=not cfg.progress)
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency, limit_per_host=0)
    tasks: set[asyncio.Task[None]] = set()

    async def one(req: Request, t0: float, lag: float) -> None:
        try:
            r = await send_one(session, req, cfg, t0, lag)
        finally:
            sem.release()
        results.append(r)
        if out:
            out.write(r.to_json() + "\n")
        bar.update(1)

    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            t0 = time.perf_counter() + 0.05
            for req in requests:
                due = t0 + req.arrival_s * cfg.time_scale
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await sem.acquire()
                task = asyncio.create_task(one(req, t0, max(0.0, time.perf_counter() - due)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks))
    finally:
        for t in tasks:
            t.cancel()
        bar.close()
        if out:
            out.close()
    order = {r.rid: i for i, r in enumerate(requests)}
    results.sort(key=lambda r: order[r.rid])
    return results


def read_results(path: str | Path) -> list[RequestResult]:
    with open(path, encoding="utf-8") as f:
        return [RequestResult.from_json(line) for line in f if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvroute.bench.loadgen", description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="router or engine base URL (loopback only)")
    ap.add_argument("--api", choices=["generate", "completions", "chat"], default="generate")
    ap.add_argument("--input-ids", action="store_true", help="/generate: send input_ids instead of text")
    ap.add_argument("--workload", choices=["mooncake", "shared_prefix", "multiturn"], default="mooncake")
    ap.add_argument("--count", type=int, default=200, help="requests (mooncake: slice length; others: head)")
    ap.add_argument("--start", type=int, default=0, help="mooncake: first request of the slice")
    ap.add_argument("--rate", type=float, default=1.0, help="arrival rate factor (2 = twice as fast)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="the fleet's time_scale")
    ap.add_argument("--max-concurrency", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request wall timeout (s)")
    ap.add_argument("--out", help="results as JSON lines")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.workload == "mooncake":
        wl = build("mooncake", start=a.start, count=a.count)
    else:
        wl = build(a.workload).head(a.count)
    wl = wl.with_rate(a.rate)
    cfg = LoadgenConfig(
        a.url, a.api, a.input_ids, a.time_scale, a.max_concurrency, a.timeout, progress=not a.no_progress
    )
    res = asyncio.run(run_load(wl.requests, cfg, a.out))
    ok = [r for r in res if r.ok]
    ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    mean = sum(ttfts) / len(ttfts) if ttfts else float("nan")
    print(f"{len(ok)}/{len(res)} ok, mean TTFT {mean:.3f} s", file=sys.stderr)
    return 0 if len(ok) == len(res) else 1


if __name__ == "__main__":
    raise SystemExit(main())
