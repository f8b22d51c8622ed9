"""scripts/rename_imports.py: each rewrite rule on a table of lines, idempotence, pyproject's mapping, and the
whole rename on a copy of this tree (imports, `python -m kvroute`, a test module passing there)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("rename_imports", ROOT / "scripts" / "rename_imports.py")
assert _spec is not None and _spec.loader is not None
rename: Any = importlib.util.module_from_spec(_spec)
sys.modules["rename_imports"] = rename  # dataclasses look their module up by name
_spec.loader.exec_module(rename)
TREE = rename.Tree(ROOT)

CASES = [
    # (line before, line after, why)
    ("from router.core import Router\n", "from kvroute.router.core import Router\n", "a module import"),
    ("from router import Router\n", "from kvroute import Router\n", "the public API"),
    ("from router import Router, __version__\n", "from kvroute import Router, __version__\n", "API names"),
    ("from router import app\n", "from kvroute.router import app\n", "not public API: the subpackage"),
    (
        "    from engines.sim.fleet import SimFleet\n",
        "    from kvroute.engines.sim.fleet import SimFleet\n",
        "indented",
    ),
    ("from cache_index.hashing import (\n", "from kvroute.cache_index.hashing import (\n", "parenthesised"),
    ("import engines.gpu.launch as launch\n", "import kvroute.engines.gpu.launch as launch\n", "aliased"),
    (
        "import bench.compare\n",
        "import kvroute.bench.compare  # noqa: F401 (loads the submodule)\nfrom kvroute import bench\n",
        "binds `bench` as before",
    ),
    ("import router\n", "from kvroute import router\n", "binds `router` as before"),
    ('cmd = [py, "-m", "router", "serve"]\n', 'cmd = [py, "-m", "kvroute", "serve"]\n', "-m router"),
    ('argv = ["-m", "bench.compare"]\n', 'argv = ["-m", "kvroute.bench.compare"]\n', "-m module string"),
    ("python -m bench.pd_bench --duration 60\n", "python -m kvroute.bench.pd_bench --duration 60\n", "prose"),
    ("`.venv/bin/python -m router serve`\n", "`.venv/bin/python -m kvroute serve`\n", "docs command"),
    ('open(out / "router.log")\n', 'open(out / "router.log")\n', "a file name, not a module"),
    ('files("router.observability")\n', 'files("kvroute.router.observability")\n', "package resources"),
    (
        'setattr("router.workers.WorkerRegistry.add", f)\n',
        'setattr("kvroute.router.workers.WorkerRegistry.add", f)\n',
        "attr path",
    ),
    ("see `router.breaker` for why\n", "see `kvroute.router.breaker` for why\n", "a module named in docs"),
    ("the router.core module\n", "the router.core module\n", "unquoted prose stays"),
    ("`router/cli.py` is the CLI\n", "`router/cli.py` is the CLI\n", "paths stay (the layout stays)"),
    ("from routers import x\nimport routerx\n", "from routers import x\nimport routerx\n", "other names"),
    ("from .core import Router\n", "from .core import Router\n", "relative imports stay"),
    (
        "python -m mypy router cache_index\n",
        "python -m mypy -p kvroute.router -p kvroute.cache_index\n",
        "mypy",
    ),
]


@pytest.mark.parametrize("before, after, why", CASES, ids=[c[2] for c in CASES])
def test_rewrite_rules(before: str, after: str, why: str) -> None:
    out = rename.rewrite_python_like(before, TREE)
    assert out == after, why
    assert rename.rewrite_python_like(out, TREE) == out  # idempotent


def test_pyproject_gets_the_package_dir_mapping() -> None:
    old = (ROOT / "pyproject.toml").read_text()
    new = rename.rewrite_pyproject(old, TREE)
    data = tomllib.loads(new)
    st = data["tool"]["setuptools"]
    assert data["project"]["scripts"]["kvroute"] == "kvroute.router.cli:main"
    assert st["dynamic"]["version"]["attr"] == "kvroute.router._version.__version__"
    assert st["package-dir"] == {
        "kvroute": "kvroute",
        "kvroute.router": "router",
        "kvroute.engines": "engines",
        "kvroute.cache_index": "cache_index",
        "kvroute.bench": "bench",
    }
    assert {"kvroute", "kvroute.router", "kvroute.router.discovery", "kvroute.engines.sim"} <= set(
        st["packages"]
    )
    assert "find" not in st.get("packages", {}) and all(k.startswith("kvroute") for k in st["package-data"])
    overrides = [m for o in data["tool"]["mypy"]["overrides"] for m in o["module"]]
    assert overrides and all(m.startswith("kvroute.") for m in overrides)
    assert rename.rewrite_pyproject(new, TREE) == new  # idempotent


def _copy_tree(dest: Path) -> Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in rename.SKIP_DIRS or n.endswith(".egg-info")} - {"kvroute"}

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    return dest


@pytest.mark.slow
def test_rename_on_a_copy_of_the_tree(tmp_path) -> None:
    """Applied to a copy: nothing left to rewrite, a second run changes nothing, `kvroute` imports from
    the checkout (no install) and the moved-to names work end to end in a test module."""
    copy = _copy_tree(tmp_path / "repo")
    assert rename.main(["--root", str(copy)]) == 0
    assert rename.leftovers(copy) == []
    assert rename.main(["--root", str(copy), "--check"]) == 0  # idempotent: nothing would change
    assert (copy / "kvroute" / "router").is_symlink() and (copy / "kvroute" / "router" / "core.py").is_file()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def py(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=300
        )

    out = py(
        "-c", "import kvroute, kvroute.router.cli as c; from kvroute import Router; print(kvroute.__file__)"
    )
    assert out.returncode == 0 and out.stdout.strip() == str(copy / "kvroute" / "__init__.py"), out.stderr
    out = py("-m", "kvroute", "--version")
    assert out.returncode == 0 and out.stdout.startswith("kvroute "), out.stderr
    out = py(
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/router/test_config.py",
        "tests/router/test_discovery_config.py",
    )
    assert out.returncode == 0, out.stdout[-3000:]


def test_module_paths_built_at_run_time_are_flagged(tmp_path) -> None:
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "__init__.py").write_text("")
    (tmp_path / "router" / "m.py").write_text('x = f"router.policies.{name}"\ny = "router.m"\n')
    assert rename.to_check(tmp_path, rename.Tree(tmp_path)) == [
        'router/m.py:1: x = f"router.policies.{name}"'
    ]
