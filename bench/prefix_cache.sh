#!/usr/bin/env bash
# Prefix caching's effect on a GPU: the multi-turn chat workload (bench/serving.py --multi-turn) against
# one server with the prefix cache on, then against a fresh server with it off (PREFIX_CACHING=0), same
# shape (random weights), same prompts; a summary of both side by side.
#
# Two arrival patterns per server, each with its own system prompt and messages (--seed):
#   lockstep:  every conversation starts at once and sends its next turn the moment an answer ends, so
#              all 64 conversations' turns arrive together (a burst of prompt work every turn);
#   staggered: conversations start as a Poisson process (STAGGER_RATE a second) and users pause
#              THINK_TIME seconds on average between turns, as people do.
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
STAGGER_RATE=${STAGGER_RATE:-4}  # conversations starting per second (staggered)
THINK_TIME=${THINK_TIME:-2}  # mean seconds between an answer and the next message (staggered)
PATTERNS=${PATTERNS:-"lockstep staggered"}
PORT=${PORT:-8091}
LAUNCHER_ARGS=${LAUNCHER_ARGS:-}  # more launcher flags
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/env.sh
MODEL_DIR=${MODEL_DIR:-/tmp/$SHAPE-prefix}
[[ -f $MODEL_DIR/config.json ]] || $PY bench/make_model_dir.py "$MODEL_DIR" --shape "$SHAPE" > /dev/null || exit 1
URL=http://127.0.0.1:$PORT
for mode in on off; do
    [[ $mode == on ]] && caching=1 || caching=0
    # shellcheck disable=SC2086
    PREFIX_CACHING=$caching setsid $PY -m tgi_launcher --model-id "$MODEL_DIR" --load-format dummy --port "$PORT" \
        --hostname 127.0.0.1 --max-concurrent-requests 512 $LAUNCHER_ARGS > "$OUT/launcher_$mode.log" 2>&1 &
    launcher=$!
    for _ in $(seq 900); do curl -sf "$URL/health" > /dev/null && break; kill -0 $launcher 2> /dev/null || break; sleep 1; done
    curl -sf "$URL/health" > /dev/null || { echo "the $mode server did not start"; tail -20 "$OUT/launcher_$mode.log"; exit 1; }
    seed=0
    for pattern in $PATTERNS; do
        [[ $pattern == staggered ]] && arrivals="--request-rate $STAGGER_RATE --think-time $THINK_TIME" || arrivals=""
        # shellcheck disable=SC2086
        $PY bench/serving.py --base-url "$URL" --tokenizer "$MODEL_DIR" --multi-turn "$CONVERSATIONS" --turns "$TURNS" \
            --system-prompt-len "$SYSTEM_PROMPT_LEN" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --seed $seed $arrivals \
            --result-json "$OUT/${pattern}_$mode.json" > "$OUT/serving_${pattern}_$mode.log" 2>&1 \
            || { tail -20 "$OUT/serving_${pattern}_$mode.log"; kill -TERM -- -$launcher; exit 1; }
        seed=$((seed + 10))
    done
    kill -TERM -- -$launcher; wait $launcher
done
$PY - "$OUT" $PATTERNS <<'PY'
import json, sys
out, patterns = sys.argv[1], sys.argv[2:]
keys = ("completed", "failed", "num_output_length_mismatches", "output_throughput", "total_input_tokens",
        "total_cached_input_tokens", "median_ttft_first_turn_ms", "p99_ttft_first_turn_ms", "median_ttft_later_turns_ms",
        "p99_ttft_later_turns_ms", "median_tpot_ms")
summary = {}
for pattern in patterns:
    runs = {mode: json.load(open(f"{out}/{pattern}_{mode}.json")) for mode in ("on", "off")}
    part = {f"cache_{mode}": {k: run["results"].get(k) for k in keys} for mode, run in runs.items()}
    part["server_info_prefix_caching"] = {mode: (run["server_info"] or {}).get("prefix_caching") for mode, run in runs.items()}
    on, off = part["cache_on"], part["cache_off"]
    part["later_turns_ttft_p50_off_over_on"] = round(off["median_ttft_later_turns_ms"] / on["median_ttft_later_turns_ms"], 2)
    part["output_throughput_on_over_off"] = round(on["output_throughput"] / off["output_throughput"], 3)
    part["arrivals"] = runs["on"]["config"]["request_rate"], runs["on"]["config"]["think_time"]
    summary[pattern] = part
    summary["device"], summary["date"], summary["commit"] = (runs["on"].get(k) for k in ("device", "date", "git_commit"))
json.dump(summary, open(f"{out}/prefix_cache_summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
