#!/usr/bin/env bash
# Constrained decoding's cost on a GPU: one server (a real shape, random weights), the same workload
# unconstrained and then with a JSON schema per request (SCHEMAS distinct ones), back to back.
#
#   SHAPE=llama-3.1-8b CONCURRENCY=64 NUM_PROMPTS=256 OUT=/tmp/out bash bench/structured.sh
set -u
OUT=${OUT:-/tmp/structured}
SHAPE=${SHAPE:-llama-3.1-8b}
CONCURRENCY=${CONCURRENCY:-64}
NUM_PROMPTS=${NUM_PROMPTS:-256}
SCHEMAS=${SCHEMAS:-8}
PORT=${PORT:-8090}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/env.sh
MODEL_DIR=/tmp/$SHAPE-structured
$PY bench/make_model_dir.py "$MODEL_DIR" --shape "$SHAPE" > /dev/null || exit 1
$PY -m tgi_launcher --model-id "$MODEL_DIR" --load-format dummy --port "$PORT" --hostname 127.0.0.1 \
    --max-concurrent-requests 512 > "$OUT/launcher.log" 2>&1 &
launcher=$!
trap 'kill -TERM $launcher 2> /dev/null; wait $launcher' EXIT
for _ in $(seq 600); do
    $PY -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2> /dev/null && break
    kill -0 $launcher 2> /dev/null || { tail -20 "$OUT/launcher.log"; exit 1; }
    sleep 1
done
serve() {
    $PY bench/serving.py --base-url "http://127.0.0.1:$PORT" --tokenizer "$MODEL_DIR" --num-prompts "$NUM_PROMPTS" \
        --input-len 1024 --output-len 128 --max-concurrency "$CONCURRENCY" "$@" > /dev/null
}
serve --result-json "$OUT/unconstrained.json"
serve --grammar-schemas "$SCHEMAS" --result-json "$OUT/constrained.json"
$PY - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
free, constrained = (json.load(open(f"{out}/{name}.json"))["results"] for name in ("unconstrained", "constrained"))
keys = ("completed", "failed", "output_throughput", "median_ttft_ms", "median_tpot_ms", "num_output_length_mismatches")
summary = {"unconstrained": {k: free.get(k) for k in keys},
           "constrained": {k: constrained.get(k) for k in keys + ("median_ttft_new_schema_ms", "p99_ttft_new_schema_ms",
                                                              "median_ttft_cached_schema_ms", "p99_ttft_cached_schema_ms")},
           "constrained_share_of_unconstrained_tok_s": round(constrained["output_throughput"] / free["output_throughput"], 3)}
json.dump(summary, open(f"{out}/structured_summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
EOF
