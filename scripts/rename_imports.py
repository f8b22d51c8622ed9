#!/usr/bin/env python3
"""Installs the repository's folders under one import name, `kvroute`, without moving them (issue 17).

The wheel used to install four generic top-level packages (`router`, `engines`, `cache_index`, `bench`)
that collide with PyPI distributions and with any application's own `router/`. After this script:
- the folders stay where they are; setuptools' package-dir mapping installs them as `kvroute.router`,
  `kvroute.engines`, `kvroute.cache_index`, `kvroute.bench`, and nothing else at the top level;
- `kvroute/` at the root holds the public API (`from kvroute import Router`), `python -m kvroute`, and
  one symlink per folder (`kvroute/router -> ../router`) so a checkout imports `kvroute.router` with no
  install and static tools (mypy, IDEs) see the same module names as the wheel;
- every import, module path string (`"router.cli"`, `resources.files("router.observability")`),
  `python -m router` / `-m bench.compare` invocation, doc snippet, pyproject entry point, dynamic version,
  package-data key and mypy override uses the `kvroute.` names.

Idempotent: a second run changes nothing (re-run it after adding a subpackage: it refreshes the package
list in pyproject.toml, which a test of the wheel checks). To apply, on a clean main after everyone landed:
    python scripts/rename_imports.py --check        # preview; exit 1 if anything would change
    python scripts/rename_imports.py                # apply; ends "N changes; 0 left over" (exit 1 if not)
    git diff --name-only -- '*.py' | xargs ruff check --fix --select I   # import order after the rewrite
    ruff check .                                    # rewrap the few lines that grew past 110 characters
    python -m mypy -p kvroute.router -p kvroute.cache_index
    python -m pytest -q && bash scripts/setup.sh    # setup.sh re-installs: the entry point moved
    git add -A && git commit
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "kvroute"
FOLDERS = ("router", "engines", "cache_index", "bench")
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".txt", ".rst", ""}
SKIP_DIRS = {
    ".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache",
    ".pytest_cache", ".hypothesis", PACKAGE,
}  # fmt: skip
# Left alone: this script, its test, and the import-graph test (it names modules by folder, both layouts).
SELF = {
    Path("scripts/rename_imports.py"),
    Path("tests/scripts/test_rename_imports.py"),
    Path("tests/router/test_import_graph.py"),
}
# `from router import <these>` becomes `from kvroute import ...`: the public API of kvroute/__init__.py.
PUBLIC_API = ("Router", "LoadTracker", "Ticket", "WorkerStats", "NoWorkerAvailable", "__version__")

ROOTS = "|".join(FOLDERS)
_FROM = re.compile(
    rf"^(?P<indent>[ \t]*)from (?P<root>{ROOTS})(?P<rest>(?:\.[\w.]+)?) import (?P<names>.*)$", re.M
)
_IMPORT = re.compile(
    rf"^(?P<indent>[ \t]*)import (?P<mod>(?:{ROOTS})(?:\.[\w.]+)?)(?P<alias> as \w+)?[ \t]*$", re.M
)
_DASH_M = re.compile(rf"(?P<pre>-m[ \t]+|[\"']-m[\"'],[ \t]*[\"'])(?P<mod>(?:{ROOTS})(?:\.[\w.]+)?)\b(?!/)")
_QUOTED = re.compile(rf"(?P<q>[\"'`])(?P<mod>(?:{ROOTS})(?:\.\w+)+)(?P<tail>[\"'`:])")
_MYPY_CMD = re.compile(r"mypy router cache_index")


@dataclass
class Tree:
    """The repository being rewritten: which dotted names are real modules (so `"router.log"`, a file
    name in a string, is left alone)."""

    root: Path
    modules: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for folder in FOLDERS:
            base = self.root / folder
            for path in base.rglob("*"):
                if set(path.relative_to(self.root).parts) & SKIP_DIRS:
                    continue
                rel = path.relative_to(self.root)
                if path.suffix == ".py":
                    parts = rel.with_suffix("").parts
                    self.modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
                elif path.is_dir() and (path / "__init__.py").exists():
                    self.modules.add(".".join(rel.parts))

    def is_module(self, dotted: str) -> bool:
        """A module of the tree, or an attribute path under one (`router.workers.WorkerRegistry`)."""
        parts = dotted.split(".")
        return any(".".join(parts[:i]) in self.modules for i in range(2, len(parts) + 1))

    def packages(self) -> list[str]:
        pkgs = {m for m in self.modules if (self.root / Path(*m.split(".")) / "__init__.py").exists()}
        return sorted(pkgs)


def rewrite_python_like(text: str, tree: Tree) -> str:
    """Imports at line starts, `-m` invocations, quoted module paths that name real modules."""

    def from_(m: re.Match[str]) -> str:
        root, rest, names = m["root"], m["rest"], m["names"]
        bare = [n.strip() for n in names.strip("()").split(",") if n.strip()]
        plain = [n.split(" as ")[0].strip() for n in bare]
        if root == "router" and not rest and plain and all(n in PUBLIC_API for n in plain):
            return f"{m['indent']}from {PACKAGE} import {names}"
        return f"{m['indent']}from {PACKAGE}.{root}{rest} import {names}"

    def import_(m: re.Match[str]) -> str:
        mod, alias, indent = m["mod"], m["alias"], m["indent"]
        if alias:
            return f"{indent}import {PACKAGE}.{mod}{alias}"
        root, _, sub = mod.partition(".")
        if not sub:  # `import router` binds `router`: keep that name
            return f"{indent}from {PACKAGE} import {root}"
        # `import bench.compare` binds `bench` and loads the submodule: do both under kvroute.
        loads = f"{indent}import {PACKAGE}.{mod}  # noqa: F401 (loads the submodule)"
        return f"{loads}\n{indent}from {PACKAGE} import {root}"

    def dash_m(m: re.Match[str]) -> str:
        mod = m["mod"]
        if mod == "router":
            return f"{m['pre']}{PACKAGE}"
        if not tree.is_module(mod):
            return m.group(0)
        return f"{m['pre']}{PACKAGE}.{mod}"

    def quoted(m: re.Match[str]) -> str:
        if not tree.is_module(m["mod"]):
            return m.group(0)
        return f"{m['q']}{PACKAGE}.{m['mod']}{m['tail']}"

    text = _FROM.sub(from_, text)
    text = _IMPORT.sub(import_, text)
    text = _DASH_M.sub(dash_m, text)
    text = _QUOTED.sub(quoted, text)
    return _MYPY_CMD.sub(f"mypy -p {PACKAGE}.router -p {PACKAGE}.cache_index", text)


def rewrite_pyproject(text: str, tree: Tree) -> str:
    """Entry point, dynamic version, package-data keys, mypy overrides; the package discovery becomes the
    package-dir mapping (its package list refreshed on every run: new subpackages since the last one)."""
    text = re.sub(rf'(= *")({ROOTS})(\.[\w.]*:main")', rf"\1{PACKAGE}.\2\3", text)
    text = re.sub(rf'(attr *= *")({ROOTS})\.', rf"\1{PACKAGE}.\2.", text)
    text = re.sub(
        rf'^"({ROOTS})((?:\.\w+)*)"(\s*=)', rf'"{PACKAGE}.\1\2"\3', text, flags=re.M
    )  # package-data
    text = re.sub(rf'"({ROOTS})((?:\.\w+)*)\.\*"', rf'"{PACKAGE}.\1\2.*"', text)  # mypy overrides
    packages = "".join(f'  "{p}",\n' for p in [PACKAGE, *(f"{PACKAGE}.{m}" for m in tree.packages())])
    listing = f"packages = [\n{packages}]\n"
    if "[tool.setuptools.package-dir]" in text:
        return re.sub(r'packages = \[\n(?:  "[\w.]+",\n)*\]\n', lambda _: listing, text, count=1)
    mapping = "".join(f'"{PACKAGE}.{f}" = "{f}"\n' for f in FOLDERS)
    block = (
        "[tool.setuptools]\n"
        "# The folders stay at the root and install as kvroute's subpackages (scripts/rename_imports.py);\n"
        "# re-run that script after adding a subpackage (a test checks the wheel holds every one).\n"
        f"{listing}\n"
        f'[tool.setuptools.package-dir]\n"{PACKAGE}" = "{PACKAGE}"\n{mapping}'
    )
    new, n = re.subn(r"\[tool\.setuptools\.packages\.find\]\ninclude = \[[^\]]*\]\n", lambda _: block, text)
    if n != 1:
        raise SystemExit(
            "pyproject.toml: no [tool.setuptools.packages.find] block to replace; edit it by hand"
        )
    return new


INIT = '''"""kvroute: a KV-cache-aware request router and load balancer for SGLang serving fleets.

The public API, for use as a library (the same decisions as the HTTP proxy, without HTTP):

    from kvroute import Router
    from kvroute.router.types import Worker, WorkerState

The repository's folders are this package's subpackages: `kvroute.router` (routing core, HTTP proxy,
registry, discovery, admin), `kvroute.engines` (SGLang client and simulated/GPU engines),
`kvroute.cache_index` (block hashing and the radix index), `kvroute.bench` (benchmarks).
"""

from kvroute.router import LoadTracker, NoWorkerAvailable, Router, Ticket, WorkerStats
from kvroute.router._version import __version__

__all__ = ["LoadTracker", "NoWorkerAvailable", "Router", "Ticket", "WorkerStats", "__version__"]
'''

MAIN = '''"""`python -m kvroute` = the `kvroute` command."""

import sys

from kvroute.router.cli import main

if __name__ == "__main__":  # not when re-imported as `__mp_main__` by a `serve --processes` child
    sys.exit(main())
'''


@dataclass
class Change:
    path: Path
    what: str


def ensure_package(root: Path, apply: bool) -> list[Change]:
    """kvroute/__init__.py, __main__.py and the folder symlinks (created once; never overwritten)."""
    out: list[Change] = []
    pkg = root / PACKAGE
    for name, text in (("__init__.py", INIT), ("__main__.py", MAIN)):
        if not (pkg / name).exists():
            out.append(Change(pkg / name, "create"))
            if apply:
                pkg.mkdir(exist_ok=True)
                (pkg / name).write_text(text)
    for folder in FOLDERS:
        link = pkg / folder
        if not link.is_symlink():
            out.append(Change(link, f"symlink -> ../{folder}"))
            if apply:
                pkg.mkdir(exist_ok=True)
                link.symlink_to(Path("..") / folder, target_is_directory=True)
    return out


def text_files(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            p = Path(dirpath) / name
            if (rel_dir / name) in SELF or p.suffix not in TEXT_SUFFIXES or p.is_symlink():
                continue
            if p.suffix == "" and not _is_script(p):
                continue
            yield p


def _is_script(p: Path) -> bool:
    try:
        return p.read_bytes()[:2] == b"#!"
    except OSError:
        return False


def run(root: Path, apply: bool) -> list[Change]:
    tree = Tree(root)
    changes = ensure_package(root, apply)
    rewrite: dict[str, Callable[[str, Tree], str]] = {"pyproject.toml": rewrite_pyproject}
    for path in text_files(root):
        rel = path.relative_to(root)
        try:
            old = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        new = rewrite.get(str(rel), rewrite_python_like)(old, tree)
        if new != old:
            changed = sum(a != b for a, b in zip(old.splitlines(), new.splitlines(), strict=False))
            changes.append(Change(rel, f"{changed} lines"))
            if apply:
                path.write_text(new, encoding="utf-8")
    return changes


def leftovers(root: Path) -> list[str]:
    """Imports of the old top-level names still in .py files (what a rename must leave none of)."""
    out = []
    pattern = re.compile(rf"^\s*(from ({ROOTS})[\s.]|import ({ROOTS})\b)", re.M)
    for path in text_files(root):
        if path.suffix != ".py":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.match(line):
                out.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    return out


def to_check(root: Path, tree: Tree) -> list[str]:
    """Quoted old module paths the rules could not rewrite (f-strings, concatenations): for a human."""
    out = []
    pattern = re.compile(rf"[\"'](?:{ROOTS})\.[\w.]*\{{|[\"'](?:{ROOTS})\.[\w.]*[\"']\s*\+")
    for path in text_files(root):
        if path.suffix == ".py":
            for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if pattern.search(line):
                    out.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="repository root")
    ap.add_argument("--check", action="store_true", help="only report; exit 1 if anything would change")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    changes = run(root, apply=not args.check)
    for c in changes:
        print(f"{'would change' if args.check else 'changed'} {c.path}: {c.what}")
    if not args.check:
        left = leftovers(root)
        for line in left:
            print(f"left over (rewrite by hand): {line}", file=sys.stderr)
        for line in to_check(root, Tree(root)):
            print(f"check by hand (a module path built at run time): {line}", file=sys.stderr)
        print(f"{len(changes)} changes; {len(left)} left over")
        return 1 if left else 0
    return 1 if changes else 0


if __name__ == "__main__":
    sys.exit(main())
