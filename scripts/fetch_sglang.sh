#!/usr/bin/env bash
# Downloads the SGLang wheels (no deps) whose kv_events.py the conformance tests load by path; cached.
set -euo pipefail
CACHE=${KVROUTE_SGLANG_CACHE:-$HOME/.cache/kvroute/sglang}
mkdir -p "$CACHE"
for v in 0.5.10.post1 0.5.23; do
  if [ ! -f "$CACHE/$v/kv_events.py" ]; then
    tmp=$(mktemp -d)
    python3 -m pip download -q "sglang==$v" --no-deps -d "$tmp" || { echo "warning: could not download sglang $v" >&2; continue; }
    mkdir -p "$CACHE/$v"
    python3 - "$tmp" "$CACHE/$v" <<'PY'
import sys, zipfile, glob
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z:
    data = z.read("sglang/srt/disaggregation/kv_events.py")
open(sys.argv[2] + "/kv_events.py", "wb").write(data)
PY
    rm -rf "$tmp"
  fi
done
echo "sglang kv_events.py cached in $CACHE"
