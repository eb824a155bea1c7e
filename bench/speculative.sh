#!/usr/bin/env bash
# Speculative decoding on a GPU, two parts:
# (a) with real weights (SmolLM2 from its GGUF, $GGUF; skipped when absent) on an input-grounded
#     workload (repeat a given ~1,000-token text: bench/serving.py --rewrite README.md), one stream,
#     without and with --speculate $SPECULATE: tok/s, and the acceptance by position from /metrics;
# (b) its cost: one request's verify step (its last token and k proposed ones in one forward, sampled
#     at each) against a plain decode step, Llama-3.1-8B shape, random bf16 weights (bench/shard_step.py
#     --verify-lens). With acceptance rate a per position, a step of k proposals yields
#     1 + a + a^2 + ... + a^k tokens: one-stream tok/s = that / verify step time.
#
#   OUT=/tmp/spec GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf SPECULATE=4 VERIFY_LENS=0,1,2,3,4,6,8 bash bench/speculative.sh
set -u
OUT=${OUT:-/tmp/speculative}
SHAPE=${SHAPE:-llama-3.1-8b}
VERIFY_LENS=${VERIFY_LENS:-0,1,2,3,4,6,8}
SPECULATE=${SPECULATE:-4}
GGUF=${GGUF:-}
PORT=${PORT:-8093}
NUM_PROMPTS=${NUM_PROMPTS:-8}  # (a)'s requests, one at a time, and the tokens of each answer
OUTPUT_LEN=${OUTPUT_LEN:-256}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/env.sh
if [ -n "$GGUF" ] && [ -f "$GGUF" ]; then
    for speculate in 0 "$SPECULATE"; do
        $PY -m tgi_launcher --model-id "$GGUF" --port "$PORT" --speculate "$speculate" > "$OUT/launcher_$speculate.log" 2>&1 &
        LAUNCHER=$!
        until curl -sf "localhost:$PORT/health" > /dev/null; do
            kill -0 $LAUNCHER 2> /dev/null || { tail -20 "$OUT/launcher_$speculate.log"; exit 1; }
            sleep 1
        done
        $PY bench/serving.py --base-url "http://127.0.0.1:$PORT" --rewrite README.md --num-prompts "$NUM_PROMPTS" --input-len 1000 \
            --output-len "$OUTPUT_LEN" --max-concurrency 1 --warmup 1 --result-json "$OUT/rewrite_speculate_$speculate.json" \
            > "$OUT/rewrite_speculate_$speculate.txt" 2>&1
        curl -s "localhost:$PORT/metrics" | grep -E "^tgi_speculative_(proposed|accepted)_tokens_total" > "$OUT/rewrite_metrics_$speculate.txt"
        kill $LAUNCHER; wait $LAUNCHER
        echo "== --speculate $speculate"; grep -E "Output token throughput|Median TPOT" "$OUT/rewrite_speculate_$speculate.txt"
        cat "$OUT/rewrite_metrics_$speculate.txt"
    done
fi
$PY bench/shard_step.py --shape "$SHAPE" --batch-sizes 1 --decode-steps 32 --prompt-len 1024 --prefill-lens "" \
    --verify-lens "$VERIFY_LENS" > "$OUT/verify_steps.json" 2> "$OUT/verify_steps.log" || { tail -20 "$OUT/verify_steps.log"; exit 1; }
$PY - "$OUT/verify_steps.json" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
steps = {row["proposed_tokens"]: row["step_median_ms"] for row in run["verify"]}
plain = run["results"][0]["decode_step_median_ms"]  # a plain decode step (its CUDA graph on a GPU)
summary = {"device": run["device"], "plain_decode_step_ms": plain, "verify": []}
for k, ms in sorted(steps.items()):
    implied = {f"tok_s_at_acceptance_{a}": round(sum(a**i for i in range(k + 1)) / ms * 1000, 1) for a in (0.5, 0.7, 0.9)}
    summary["verify"].append({"proposed_tokens": k, "step_ms": ms, "over_plain": round(ms / plain, 3), **implied})
json.dump(summary, open(sys.argv[1].replace(".json", "_summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
