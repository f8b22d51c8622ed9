"""Monitoring as SGLang's router operators expect it: a metrics listener of its own
(`--prometheus-host/--prometheus-port`), process and Python series, a build-info series, counters that
are counters; and a real `kvroute serve` process started with the peers' flags."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kvroute.engines.sim.fleet import SimFleet, free_port


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read().decode()


async def test_event_counters_are_counters_and_runtime_series_exist(start_router: Any) -> None:
    async with SimFleet(workers=1, time_scale=0.01) as fleet:
        r = await start_router(worker_urls=tuple(fleet.urls), policy="kv_aware")
        await r.wait_healthy(1)
        async with r.session.post(r.url + "/generate", json={"text": "x " * 64}) as resp:
            assert resp.status == 200
        async with r.session.get(r.url + "/metrics") as resp:
            fam = _families(await resp.text())
        assert fam["kvroute_events"].type == "counter" and fam["kvroute_event_gaps"].type == "counter"
        events = [s for s in fam["kvroute_events"].samples if s.name == "kvroute_events_total"]
        assert events and events[0].labels["worker"] == fleet.urls[0]
        first = events[0].value
        assert first > 0
        async with r.session.post(r.url + "/generate", json={"text": "y " * 64}) as resp:
            assert resp.status == 200
        for _ in range(50):  # the engine's events arrive asynchronously
            async with r.session.get(r.url + "/metrics") as resp:
                fam = _families(await resp.text())
            now = [s.value for s in fam["kvroute_events"].samples if s.name == "kvroute_events_total"][0]
            if now > first:
                break
            await __import__("asyncio").sleep(0.05)
        assert now > first  # a counter moves by what arrived, it never restarts at a scrape
        assert "process_resident_memory_bytes" in fam and "python_info" in fam
        assert "python_gc_objects_collected" in fam
        assert "kvroute_build_info" in fam


def test_serve_with_peer_flags_has_a_metrics_listener(tmp_path: Path) -> None:
    """`kvroute serve` started with a command line of SGLang's router: metrics on their own port, the log
    in --log-dir as JSON lines, a warning for a flag without effect, and SIGTERM stops it."""
    port, mport = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "kvroute", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--worker-urls", "http://127.0.0.1:9", "--policy", "cache_aware", "--cache-threshold", "0.5",
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(mport), "--log-dir", str(tmp_path),
        "--log-json", "--tokenizer-cache-enable-l0", "--shutdown-grace-period-secs", "1",
    ]  # fmt: skip
    err_path = tmp_path / "stderr.txt"
    with err_path.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, text = _get(f"http://127.0.0.1:{mport}/metrics")
                break
            except OSError:
                assert proc.poll() is None, err_path.read_text()
                assert time.monotonic() < deadline, "metrics listener never came up"
                time.sleep(0.1)
        assert status == 200 and "kvroute_requests" in text and "process_cpu_seconds_total" in text
        assert _get(f"http://127.0.0.1:{port}/liveness")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in (tmp_path / "kvroute.log").read_text().splitlines()]
    messages = [x["message"] for x in lines]
    assert any("--tokenizer-cache-enable-l0 has no effect in kvroute" in m for m in messages)
    assert any("metrics listener on http://127.0.0.1:" in m for m in messages)
    assert all({"ts", "level", "logger", "message"} <= set(x) for x in lines)


def test_serve_https_with_the_peers_tls_flags(tmp_path: Path) -> None:
    """`--tls-cert-path/--tls-key-path` (SGLang router's flags): the router serves HTTPS; a key that does
    not load stops it with status 2 and the reason."""
    import shutil
    import ssl

    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (needed to make a test certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    base = [sys.executable, "-m", "kvroute", "serve", "--host", "127.0.0.1", "--port", str(port)]
    bad = subprocess.run(
        [*base, "--tls-cert-path", str(cert), "--tls-key-path", str(cert)], capture_output=True
    )
    assert bad.returncode == 2 and b"--tls-cert-path/--tls-key-path: cannot load" in bad.stderr
    proc = subprocess.Popen(
        [*base, "--tls-cert-path", str(cert), "--tls-key-path", str(key)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/liveness", timeout=1, context=ctx
                ) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
