"""Installing and running kvroute as a dependency: licence, one version, runtime deps, clear one-line errors
for missing extras and bad paths, the KVROUTE_* environment, and a wheel that works outside the repository."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from kvroute import __version__
from kvroute.engines.sim.fleet import free_port
from kvroute.router.cli import main
from kvroute.router.config import ConfigError, RouterConfig, build_config, unknown_env

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# After scripts/rename_imports.py the folders install under `kvroute` (package-dir mapping); before, at
# the top level. The wheel test checks whichever layout pyproject.toml declares.
MAPPED = "package-dir" in PYPROJECT["tool"]["setuptools"]
PREFIX = "kvroute/" if MAPPED else ""
API = "kvroute" if MAPPED else "router"  # where `Router` is imported from
TYPES = "kvroute.router.types" if MAPPED else "kvroute.router.types"


def test_version_has_one_source(capsys) -> None:
    """pyproject reads the version from the one module that writes it; the CLI and metrics report it."""
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    module, _, name = attr.rpartition(".")
    assert "version" in PYPROJECT["project"]["dynamic"] and "version" not in PYPROJECT["project"]
    assert getattr(importlib.import_module(module), name) == __version__
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"kvroute {__version__}"

    from kvroute.router.metrics import Metrics

    text = Metrics().exposition().decode()
    assert f'kvroute_build_info{{python="{sys.version.split()[0]}",version="{__version__}"}} 1.0' in text


def test_licence_and_runtime_dependencies() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert any(c.startswith("Programming Language :: Python :: 3.11") for c in project["classifiers"])
    runtime = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert not runtime & {"pytest", "pytest-asyncio", "pytest-timeout", "hypothesis"}, runtime


def test_bench_without_its_extra_says_what_to_install(capsys, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tqdm" else real(n, *a))
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'kvroute[bench]'" in err and "tqdm" in err


def test_tokenizer_problems_are_one_line_config_errors(tmp_path, capsys, monkeypatch) -> None:
    """A missing path is a ConfigError naming the path, not 'cannot listen on 127.0.0.1:PORT: None'."""
    missing = tmp_path / "no-such-model"
    assert main(["serve", "--port", "0", "--tokenizer", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer.json at" in err and str(missing) in err and "cannot listen" not in err
    assert err.count("\n") == 1

    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # the `hf` extra not installed
    assert main(["serve", "--port", "0", "--tokenizer", str(tok)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'kvroute[hf]'" in err and err.count("\n") == 1


def test_kvroute_config_environment_variable_is_honoured(tmp_path) -> None:
    path = tmp_path / "kvroute.toml"
    path.write_text('policy = "least_load"\nport = 31234\n')
    c = build_config({}, environ={"KVROUTE_CONFIG": str(path), "KVROUTE_PORT": "31235"})
    assert (c.policy, c.port) == ("least_load", 31235)  # env beats the file it names
    other = tmp_path / "other.toml"
    other.write_text('policy = "round_robin"\n')
    c = build_config({"config": str(other)}, environ={"KVROUTE_CONFIG": str(path)})
    assert c.policy == "round_robin" and c.port == RouterConfig().port  # --config wins over KVROUTE_CONFIG
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_config({}, environ={"KVROUTE_CONFIG": str(tmp_path / "absent.toml")})


def test_misspelt_settings_are_reported(tmp_path, caplog, monkeypatch) -> None:
    """A misspelt file key is an error; a misspelt KVROUTE_* variable a warning at start (the environment
    is shared with other tools), both with the closest real name."""
    bad = tmp_path / "bad.toml"
    bad.write_text("admin_tokn = 'x'\n")
    with pytest.raises(
        ConfigError, match=r"unknown configuration key: 'admin_tokn' \(did you mean 'admin_token'"
    ):
        build_config({"config": str(bad)}, environ={})
    env = {"KVROUTE_ADMIN_TOKN": "x", "KVROUTE_PORT": "1", "KVROUTE_SGLANG_CACHE": "/c", "KVROUTE_ZZZ": "1"}
    assert unknown_env(env) == [
        "unknown environment variable KVROUTE_ADMIN_TOKN ignored (did you mean KVROUTE_ADMIN_TOKEN?)",
        "unknown environment variable KVROUTE_ZZZ ignored",
    ]
    monkeypatch.setenv("KVROUTE_MAX_RETRIS", "3")
    with caplog.at_level(logging.WARNING, logger="kvroute"):
        assert main(["serve", "--port", "0", "--tokenizer", str(tmp_path / "none")]) == 2
    assert "KVROUTE_MAX_RETRIS ignored (did you mean KVROUTE_MAX_RETRIES?)" in caplog.text


def _build_wheel(out: Path) -> Path:
    """From a copy of the sources: an in-place build reuses ./build, whose stale modules (files since
    moved or deleted) would end up in the wheel."""
    src = out / "src"
    skip = {".git", ".venv", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
    shutil.copytree(
        ROOT,
        src,
        symlinks=True,
        ignore=lambda d, names: {n for n in names if n in skip or n.endswith(".egg-info")},
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        cwd=out,
        timeout=180,
    )
    (wheel,) = out.glob("kvroute-*.whl")
    sdist_cmd = f"from setuptools import build_meta as b; b.build_sdist({str(out / 'sdist')!r})"
    subprocess.run([sys.executable, "-c", sdist_cmd], check=True, cwd=src, timeout=180, capture_output=True)
    (sdist,) = (out / "sdist").glob("kvroute-*.tar.gz")
    with tarfile.open(sdist) as tar:
        assert (
            f"{sdist.name[: -len('.tar.gz')]}/LICENSE" in tar.getnames()
        )  # the licence ships in the sdist too
    return wheel


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path) -> None:
    """The wheel carries the licence and the typed markers; installed into a fresh venv (dependencies
    reached through a path entry, no network), it answers `--version`, runs the README's library snippet
    and a CLI command from a directory outside the repository."""
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert f"{PREFIX}router/py.typed" in names and f"{PREFIX}cache_index/py.typed" in names
    assert not any(n.startswith(("tests/", "scripts/", "docs/")) for n in names)
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    if MAPPED:  # one import name, nothing that collides; every package of the tree is in the wheel
        assert tops == {"kvroute"}, tops
        tracked = subprocess.run(  # git's files: not ignored venvs (bench/.peers) or build output
            ["git", "ls-files", "--", "router", "engines", "cache_index", "bench"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        in_tree = {p.rpartition("/")[0] for p in tracked if p.endswith("/__init__.py")}
        in_wheel = {n[len(PREFIX) :].rpartition("/")[0] for n in names if n.endswith("/__init__.py")}
        assert in_tree <= in_wheel, (
            f"not in the wheel (re-run scripts/rename_imports.py): {in_tree - in_wheel}"
        )
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"Version: {__version__}" in meta and "License-Expression: Apache-2.0" in meta
    runtime = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    assert runtime and not [ln for ln in runtime if "pytest" in ln], runtime

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    with zipfile.ZipFile(wheel) as z:  # install = unpack a pure wheel into site-packages
        z.extractall(site)
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # aiohttp & co. from this venv
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    snippet = (
        f"import {API}\n"
        f"assert {API}.__file__.startswith({str(site)!r}), {API}.__file__\n"
        f"from {API} import Router\n"
        f"from {TYPES} import Worker, WorkerState\n"
        "r = Router(block_size=16, policy='kv_aware')\n"
        "for u in ('http://10.0.0.1:30000', 'http://10.0.0.2:30000'):\n"
        "    r.add_worker(Worker(u, state=WorkerState.HEALTHY))\n"
        "req = r.routing_request(messages=[{'role': 'user', 'content': 'Summarise this contract'}])\n"
        "d = r.select(req)\n"
        "t = r.on_routed(d, req)\n"
        "r.on_finished(t, cached_tokens=None)\n"
        "print(d.worker if hasattr(d, 'worker') else d)\n"
    )
    out = subprocess.run([str(py), "-c", snippet], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "http://10.0.0." in out.stdout
    cli = [str(py), "-m", API]  # `python -m kvroute` (before the rename: `python -m kvroute`)
    out = subprocess.run([*cli, "--version"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"kvroute {__version__}", out.stderr
    plan = ["plan", "--request-rate", "2", "--prompt-tokens", "1000", "--output-tokens", "100", "--json"]
    out = subprocess.run([*cli, *plan], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and '"prefill_workers"' in out.stdout, out.stderr
    _sim_serve_one_request(cli, elsewhere, env)


def _sim_serve_one_request(cli: list[str], cwd: Path, env: dict[str, str]) -> None:
    """`kvroute sim` + `kvroute serve` from the installed wheel, one request through them."""
    sim_args = [
        "sim",
        "--workers",
        "1",
        "--base-port",
        "0",
        "--profile",
        "tiny",
        "--time-scale",
        "0.01",
        "--json",
    ]
    sim = subprocess.Popen([*cli, *sim_args], cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    router: subprocess.Popen[str] | None = None
    try:
        assert sim.stdout is not None
        worker = json.loads(sim.stdout.readline())["url"]
        port = free_port()
        router = subprocess.Popen(
            [*cli, "serve", "--worker-urls", worker, "--port", str(port)], cwd=cwd, env=env
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # bounded: the router answers /readiness 200 once the worker registered
            try:
                with urllib.request.urlopen(base + "/readiness", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert router.poll() is None and time.monotonic() < deadline, "router not ready"
            time.sleep(0.1)
        body = json.dumps({"text": "hello", "sampling_params": {"max_new_tokens": 4}}).encode()
        req = urllib.request.Request(base + "/generate", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200 and resp.headers["X-Kvroute-Worker"] == worker
            assert json.loads(resp.read())["meta_info"]["completion_tokens"] == 4
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(30)
                if proc.stdout is not None:
                    proc.stdout.close()


def test_every_command_help_renders(capsys) -> None:
    """`kvroute COMMAND --help` prints its flags (argparse %-formats help strings: a bare % breaks it)."""
    from kvroute.router.cli import COMMANDS, build_serve_parser

    text = build_serve_parser().format_help()
    assert "--service-discovery" in text and "--worker-urls" in text
    for name in ("serve", "sim", "plan"):
        assert name in COMMANDS
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0, name
        assert "usage:" in capsys.readouterr().out


def test_every_kvroute_variable_the_repository_reads_is_known() -> None:
    """A KVROUTE_* variable read anywhere in the repository (tests and scripts too) is a setting or listed
    in OTHER_ENV, so setting it never draws an 'unknown environment variable' warning."""
    import re

    read = set()
    for path in ROOT.rglob("*"):
        if path.suffix in (".py", ".sh") and not set(path.relative_to(ROOT).parts) & {
            ".venv",
            "build",
            ".git",
        }:
            text = path.read_text(errors="replace")
            read |= set(
                re.findall(r"""(?:environ(?:\.get)?[\[(]\s*|getenv\(\s*|\$\{?)["']?(KVROUTE_[A-Z_]+)""", text)
            )
            read |= set(re.findall(r"""^\s*[A-Z_]*ENV\w* = "(KVROUTE_[A-Z_]+)\"""", text, re.M))
    assert "KVROUTE_SGLANG_CACHE" in read and "KVROUTE_CONFIG" in read
    assert unknown_env({name: "1" for name in read}) == []
