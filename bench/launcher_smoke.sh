#!/usr/bin/env bash
# The container README's command on a GPU machine, without the container: `text-generation-launcher`
# configured only by TGI's environment variables (MODEL_ID, NUM_SHARD, PORT, ...) serving a local
# model directory of a real shape (random weights: LOAD_FORMAT=dummy), then /info and one /generate.
#
#   SHAPE=gemma-7b NUM_SHARD=1 OUT=/tmp/out bash bench/launcher_smoke.sh
set -u
OUT=${OUT:-/tmp/launcher-smoke}
SHAPE=${SHAPE:-gemma-7b}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/env.sh
MODEL_DIR=/tmp/$SHAPE-launcher
$PY bench/make_model_dir.py "$MODEL_DIR" --shape "$SHAPE" > /dev/null || exit 1
export MODEL_ID=$MODEL_DIR NUM_SHARD=${NUM_SHARD:-1} PORT=${PORT:-8080} LOAD_FORMAT=dummy
start=$(date +%s)
$PY -m tgi_launcher > "$OUT/launcher.log" 2>&1 &
launcher=$!
url="http://127.0.0.1:$PORT"
get() { $PY -c "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())" "$@"; }
for _ in $(seq 300); do
    get "$url/health" > /dev/null 2>&1 && break
    kill -0 $launcher 2> /dev/null || break
    sleep 1
done
echo "ready after $(($(date +%s) - start)) s"
get "$url/info" | tee "$OUT/info.json"
$PY - "$url" <<'EOF' | tee "$OUT/generate.json"
import json, sys, urllib.request
body = json.dumps({"inputs": "Hello, my name is", "parameters": {"max_new_tokens": 8, "details": True}}).encode()
request = urllib.request.Request(sys.argv[1] + "/generate", body, {"Content-Type": "application/json"})
reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
print(json.dumps({"generated_tokens": reply["details"]["generated_tokens"], "finish_reason": reply["details"]["finish_reason"]}))
EOF
kill -TERM $launcher
wait $launcher
echo "launcher exited with $?"
tail -5 "$OUT/launcher.log"
