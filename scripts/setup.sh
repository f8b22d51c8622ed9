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
