#!/usr/bin/env bash
# Prefix caching's effect on a GPU: the multi-turn chat workload (bench/serving.py --multi-turn) against
# one server with the prefix cache on, then against a fresh server with it off (PREFIX_CACHING=0), same
# shape (random weights), same prompts; a summary of both side by side.
#
#   SHAPE=llama-3.1-8b CONVERSATIONS=64 TURNS=6 SYSTEM_PROMPT_LEN=2000 OUT=/tmp/out bash bench/prefix_cache.sh
set -u
OUT=${OUT:-/tmp/prefix-cache}
SHAPE=${SHAPE:-llama-3.1-8b}
CONVERSATIONS=${CONVERSATIONS:-64}
TURNS=${TURNS:-6}
SYSTEM_PROMPT_LEN=${SYSTEM_PROMPT_LEN:-2000}
INPUT_LEN=${INPUT_LEN:-100}  # tokens of each user message
OUTPUT_LEN=${OUTPUT_LEN:-100}  # tokens of each answer
PORT=${PORT:-8091}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/env.sh
MODEL_DIR=/tmp/$SHAPE-prefix
$PY bench/make_model_dir.py "$MODEL_DIR" --shape "$SHAPE" > /dev/null || exit 1
for mode in on off; do
    [[ $mode == on ]] && caching=1 || caching=0
    PREFIX_CACHING=$caching $PY bench/serving.py --launch "--model-id $MODEL_DIR --load-format dummy --port $PORT --max-concurrent-requests 512" \
        --launch-log "$OUT/launcher_$mode.log" --tokenizer "$MODEL_DIR" --multi-turn "$CONVERSATIONS" --turns "$TURNS" \
        --system-prompt-len "$SYSTEM_PROMPT_LEN" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
        --result-json "$OUT/multi_turn_$mode.json" > "$OUT/serving_$mode.log" 2>&1 || { tail -20 "$OUT/serving_$mode.log"; exit 1; }
done
$PY - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
runs = {mode: json.load(open(f"{out}/multi_turn_{mode}.json")) for mode in ("on", "off")}
keys = ("completed", "failed", "num_output_length_mismatches", "output_throughput", "total_input_tokens",
        "total_cached_input_tokens", "median_ttft_first_turn_ms", "p99_ttft_first_turn_ms", "median_ttft_later_turns_ms",
        "p99_ttft_later_turns_ms", "median_tpot_ms")
summary = {f"cache_{mode}": {k: run["results"].get(k) for k in keys} for mode, run in runs.items()}
summary["server_info_prefix_caching"] = {mode: (run["server_info"] or {}).get("prefix_caching") for mode, run in runs.items()}
on, off = summary["cache_on"], summary["cache_off"]
summary["later_turns_ttft_p50_off_over_on"] = round(off["median_ttft_later_turns_ms"] / on["median_ttft_later_turns_ms"], 2)
summary["output_throughput_on_over_off"] = round(on["output_throughput"] / off["output_throughput"], 3)
summary["device"], summary["date"], summary["commit"] = (runs["on"].get(k) for k in ("device", "date", "git_commit"))
json.dump(summary, open(f"{out}/prefix_cache_summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
EOF
