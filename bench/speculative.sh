#!/usr/bin/env bash
# Speculative decoding's cost on a GPU: one request's verify step (its last token and k proposed ones
# in one forward, sampled at each) against a plain decode step, Llama-3.1-8B shape, random bf16 weights
# (bench/shard_step.py --verify-lens). With acceptance rate a per position, a step of k proposals
# yields 1 + a + a^2 + ... + a^k tokens: one-stream tok/s = that / verify step time.
#
#   OUT=/tmp/spec SHAPE=llama-3.1-8b VERIFY_LENS=0,1,2,3,4,6,8 bash bench/speculative.sh
set -u
OUT=${OUT:-/tmp/speculative}
SHAPE=${SHAPE:-llama-3.1-8b}
VERIFY_LENS=${VERIFY_LENS:-0,1,2,3,4,6,8}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/env.sh
$PY bench/shard_step.py --shape "$SHAPE" --batch-sizes 1 --decode-steps 32 --prompt-len 1024 --prefill-lens "" \
    --verify-lens "$VERIFY_LENS" > "$OUT/verify_steps.json" 2> "$OUT/verify_steps.log" || { tail -20 "$OUT/verify_steps.log"; exit 1; }
$PY - "$OUT/verify_steps.json" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
steps = {row["proposed_tokens"]: row["step_median_ms"] for row in run["verify"]}
plain = steps.get(0) or run["results"][0]["decode_step_median_ms"]
summary = {"device": run["device"], "plain_decode_step_ms": plain, "verify": []}
for k, ms in sorted(steps.items()):
    implied = {f"tok_s_at_acceptance_{a}": round(sum(a**i for i in range(k + 1)) / ms * 1000, 1) for a in (0.5, 0.7, 0.9)}
    summary["verify"].append({"proposed_tokens": k, "step_ms": ms, "over_plain": round(ms / plain, 3), **implied})
json.dump(summary, open(sys.argv[1].replace(".json", "_summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
