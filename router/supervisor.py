"""`kvroute serve --processes N`: N serving processes on one port, each a router replica.

Why: one Python process tops out at a few thousand proxied requests per second (aiohttp's request
handling and four socket calls per request), while a Rust router uses every core. Each process listens
with SO_REUSEPORT, so the kernel spreads incoming connections over them; they share load, admin changes
and the policy through Redis as any replicas do (router/shared, docs/replicas.md), and Prometheus
metrics through prometheus_client's multiprocess mode (one `/metrics` answer covers every process).

The supervisor itself serves nothing and holds no routing state: it starts the processes, restarts one
that dies (with backoff), stops all of them on SIGINT/SIGTERM, and gives up when the first start fails
(a port in use, a bad policy parameter), so a wrong command line exits instead of looping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from kvroute.router.config import ConfigError, RouterConfig

log = logging.getLogger("kvroute.supervisor")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when a process imports it


@dataclass
class _Child:
    index: int
    replica_id: str
    process: BaseProcess | None = None
    ready_conn: Connection | None = None
    ready: bool = False
    started_at: float = 0.0
    restart_at: float | None = None  # when a dead child is due to start again
    backoff_s: float = 0.0


@dataclass
class ServeSupervisor:
    """Starts, watches and stops the serving processes of one `kvroute serve --processes N`."""

    config: RouterConfig
    ready_timeout_s: float = 120.0  # first start: every process listening within this, else give up
    stop_grace_s: float = 15.0  # SIGTERM to SIGKILL when stopping
    restart_min_s: float = 0.5  # first restart delay; doubles while a process keeps dying young
    restart_max_s: float = 30.0
    stable_after_s: float = 30.0  # a process that ran this long restarts at the minimum delay again
    _children: list[_Child] = field(default_factory=list, init=False)
    _metrics_dir: str | None = field(default=None, init=False)
    _own_metrics_dir: bool = field(default=False, init=False)
    _up: bool = field(default=False, init=False)  # every process has listened once: start-up is over
    _stopping: bool = field(default=False, init=False)  # SIGINT/SIGTERM received

    def run(self) -> int:
        """Blocks until stopped; the exit status of the command (0 after a clean stop)."""
        ctx = multiprocessing.get_context("spawn")  # no fork: children start without the parent's state
        base = self.config.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self._children = [_Child(i, f"{base}-p{i}") for i in range(self.config.processes)]
        self._prepare_metrics_dir()
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)

        def on_signal(signum: int, frame: Any) -> None:
            self._stopping = True

        old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        try:
            for c in self._children:
                self._start(ctx, c)
            deadline = time.monotonic() + self.ready_timeout_s
            while not self._stopping:
                status = self._step(ctx, wake_r, deadline)
                if status is not None:
                    return status
            log.info("stopping %d serving processes", len(self._children))
            return 0
        finally:
            self._stop_all()
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            wake_r.close()
            wake_w.close()
            self._cleanup_metrics_dir()

    # --- one turn of the watch loop

    def _step(self, ctx: Any, wake: socket.socket, first_deadline: float) -> int | None:
        """Wait for a signal, a process saying it listens, a process ending, or a restart coming due."""
        now = time.monotonic()
        deadlines = [c.restart_at for c in self._children if c.restart_at is not None]
        if not self._up:
            deadlines.append(first_deadline)
        waitables: list[Any] = [wake]
        for c in self._children:
            if c.process is not None:
                waitables.append(c.process.sentinel)
            if c.ready_conn is not None:
                waitables.append(c.ready_conn)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        fired = multiprocessing.connection.wait(waitables, timeout=timeout)
        if wake in fired:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                wake.recv(4096)
        if self._stopping:  # a terminal's Ctrl-C reaches the processes too: their exits are no crash
            return None
        for c in self._children:
            if c.ready_conn is not None and c.ready_conn in fired:
                self._on_ready(c)
            if c.process is not None and not c.process.is_alive():
                status = self._on_exit(c)
                if status is not None:
                    return status
            if c.restart_at is not None and time.monotonic() >= c.restart_at:
                self._start(ctx, c)
        if not self._up and all(c.ready for c in self._children):
            self._up = True
        if not self._up and time.monotonic() > first_deadline:
            waiting = sum(not c.ready for c in self._children)
            print(
                f"kvroute serve: {waiting} of {len(self._children)} processes not listening after "
                f"{self.ready_timeout_s:g} s; stopping",
                file=sys.stderr,
            )
            return 1
        return None

    def _on_ready(self, c: _Child) -> None:
        assert c.ready_conn is not None
        try:
            url = c.ready_conn.recv()
        except (EOFError, OSError):  # died before saying it listens: its exit is handled next
            url = None
        c.ready_conn.close()
        c.ready_conn = None
        if url is not None:
            c.ready = True
            log.info("kvroute process %d (%s, pid %d) listening on %s", c.index, c.replica_id, _pid(c), url)

    def _on_exit(self, c: _Child) -> int | None:
        """A process ended. During start-up: the start failed (port taken, bad parameter), stop everything
        with its status. After: restart it, at once if it had been up a while, later if it keeps dying."""
        assert c.process is not None
        code = c.process.exitcode if c.process.exitcode is not None else 1
        pid = _pid(c)
        _mark_dead(pid, self._metrics_dir)
        c.process = None
        if c.ready_conn is not None:
            c.ready_conn.close()
            c.ready_conn = None
        c.ready = False
        if not self._up:
            print(
                f"kvroute serve: process {c.index} exited with status {code} before listening; stopping",
                file=sys.stderr,
            )
            return code if code > 0 else 1
        lived = time.monotonic() - c.started_at
        c.backoff_s = (
            self.restart_min_s
            if lived >= self.stable_after_s or c.backoff_s == 0.0
            else min(self.restart_max_s, c.backoff_s * 2)
        )
        c.restart_at = time.monotonic() + c.backoff_s
        log.error(
            "kvroute process %d (pid %d) exited with status %s after %.1f s; restarting in %.1f s",
            c.index,
            pid,
            code,
            lived,
            c.backoff_s,
        )
        return None

    # --- starting and stopping processes

    def _start(self, ctx: Any, c: _Child) -> None:
        cfg = dataclasses.replace(self.config, processes=1, replica_id=c.replica_id)
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=serve_process,
            args=(cfg, writer, os.getpid()),
            name=f"kvroute-serve-{c.index}",
            daemon=False,
        )
        proc.start()
        writer.close()  # the child holds its end; EOF here means it died before saying ready
        c.process, c.ready_conn = proc, reader
        c.started_at = time.monotonic()
        c.restart_at = None

    def _stop_all(self) -> None:
        alive = [c.process for c in self._children if c.process is not None and c.process.is_alive()]
        for p in alive:
            _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in alive:
            if p.is_alive():
                log.warning(
                    "kvroute process pid %s did not stop within %.0f s; killing it", p.pid, self.stop_grace_s
                )
                _signal(p, signal.SIGKILL)
                p.join(5)
        for c in self._children:
            if c.ready_conn is not None:
                c.ready_conn.close()
                c.ready_conn = None

    # --- Prometheus multiprocess directory

    def _prepare_metrics_dir(self) -> None:
        """Every process writes its series under one directory; `/metrics` in any process sums them.
        An operator's own PROMETHEUS_MULTIPROC_DIR is used as given (and not wiped: it may be shared)."""
        given = os.environ.get(METRICS_DIR_ENV)
        if given:
            os.makedirs(given, exist_ok=True)
            self._metrics_dir = given
            return
        self._metrics_dir = tempfile.mkdtemp(prefix="kvroute-metrics-")
        self._own_metrics_dir = True
        os.environ[METRICS_DIR_ENV] = self._metrics_dir  # inherited by the spawned processes

    def _cleanup_metrics_dir(self) -> None:
        if self._own_metrics_dir and self._metrics_dir:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            os.environ.pop(METRICS_DIR_ENV, None)


def serve_process(config: RouterConfig, ready: Connection, supervisor_pid: int) -> None:
    """One serving process: `kvroute serve` with SO_REUSEPORT, telling the supervisor once it listens."""
    from kvroute.router.cli import run_async, serve, setup_logging

    _exit_with_parent(supervisor_pid)
    setup_logging(
        config.log_level,
        tag=f"[{config.replica_id.rsplit('-', 1)[-1]}]",
        log_dir=config.log_dir,
        log_json=config.log_json,
    )

    def on_ready(url: str) -> None:
        ready.send(url)
        ready.close()

    try:
        run_async(serve(config, ready=on_ready, reuse_port=True))
    except ConfigError as exc:
        print(f"kvroute serve: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(
            f"kvroute serve: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        sys.exit(1)


def _exit_with_parent(supervisor_pid: int) -> None:
    """Ask Linux for SIGTERM when the supervisor dies (even by SIGKILL): no orphan keeps serving the port
    unsupervised. Elsewhere (no prctl) the supervisor's own SIGTERM handling is all there is."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _pid(c: _Child) -> int:
    return c.process.pid if c.process is not None and c.process.pid is not None else -1


def _signal(p: BaseProcess, sig: int) -> None:
    if p.pid is not None:
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass


def _mark_dead(pid: int, metrics_dir: str | None) -> None:
    """Drop a dead process's live gauges (its counters stay: totals must not go down)."""
    if metrics_dir and pid > 0:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
