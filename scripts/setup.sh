#!/usr/bin/env bash
# Creates .venv from nothing and installs kvroute with its test and bench extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,bench]'
# SGLang's own kv_events.py is the reference publisher for conformance tests (wheels, no deps, cached).
bash scripts/fetch_sglang.sh
