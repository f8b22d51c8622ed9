#!/usr/bin/env bash
# Creates .venv from nothing and installs kvroute with its test and bench extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,bench]'
# The GPU engine's CPU path (tiny model, reference attention) is tested in CI with PyTorch's CPU build. The
# '+cpu' pin matches only a local CPU wheel (none on PyPI), so a machine without one skips those tests
# instead of downloading several GB of CUDA wheels.
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install -q 'torch==2.13.0+cpu' \
  || echo "note: no PyTorch CPU wheel here; the GPU engine's CPU tests will be skipped" >&2
# SGLang's own kv_events.py is the reference publisher for conformance tests (wheels, no deps, cached).
bash scripts/fetch_sglang.sh
# Debian packages for tests: Chromium + chromedriver (the status page's headless-browser test) and
# Prometheus' promtool (checks deploy/prometheus/ rules). Installed when root with apt; otherwise
# those tests skip and say why.
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null; } || echo "note: apt-get could not install ${need[*]}; their tests will skip" >&2
  else
    echo "note: ${need[*]} missing and not root with apt-get; their tests will skip" >&2
  fi
fi
