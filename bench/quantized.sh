#!/usr/bin/env bash
# Quantized weights on a GPU, one run: the Llama-3.1-8B shape served over HTTP (random weights) in bf16,
# with --quantize fp8 (bf16 weights quantized at load), and as fp8 (compressed-tensors), AWQ and GPTQ
# checkpoints; one stream, TTFT and 128 concurrent streams each (bench/gpu_suite.sh's http part), then
# a summary beside each one's bandwidth floor.
#
#   OUT=/tmp/quantized RUNS="bf16 fp8 awq" C128=1 bash bench/quantized.sh
set -u
OUT=${OUT:-/tmp/quantized}
RUNS=${RUNS:-"bf16 fp8-load fp8 awq gptq"}
export NUM_PROMPTS=${NUM_PROMPTS:-256} C128=${C128:-1}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
for run in $RUNS; do
    echo "== $run"
    case $run in
        bf16) PARTS=http TAG=_bf16 OUT=$OUT LOGS=$OUT/logs_$run bash bench/gpu_suite.sh ;;
        fp8-load) PARTS=http TAG=_fp8-load SHARD_ARGS="--quantize fp8" OUT=$OUT LOGS=$OUT/logs_$run bash bench/gpu_suite.sh ;;
        *) PARTS=http TAG=_$run QUANTIZATION=$run MODEL_DIR=/tmp/llama-3.1-8b-$run OUT=$OUT LOGS=$OUT/logs_$run bash bench/gpu_suite.sh ;;
    esac 2>&1 | grep -E "^==|Output token throughput|Median TPOT|Median TTFT|died|rror" | head -20
done
python3 - "$OUT" $RUNS <<'PY'
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
# bytes a decode step reads: Llama-3.1-8B's projections (6.98e9 weights) at each format's size, plus the
# bf16 embeddings' LM head and the rest (1.05e9 weights; the embedding table itself is only gathered)
projections, lm_head = 6_979_321_856, 525_336_576
per_weight = {"bf16": 2, "fp8-load": 1, "fp8": 1, "awq": 0.5 + 4 / 128, "gptq": 0.5 + 4 / 128}
summary = {}
for run in runs:
    try:
        single = json.load(open(f"{out}/http_single_stream_{run}.json"))["results"]
    except FileNotFoundError:
        continue
    c128 = json.load(open(f"{out}/http_c128_{run}.json"))["results"] if __import__("os").path.exists(f"{out}/http_c128_{run}.json") else {}
    bytes_per_step = projections * per_weight[run] + lm_head * 2
    summary[run] = {"single_stream_tok_s": round(1000 / single["median_tpot_ms"], 1), "median_tpot_ms": single["median_tpot_ms"],
                    "weight_gb_per_step": round(bytes_per_step / 1e9, 2), "c128_output_tok_s": c128.get("output_throughput")}
if "bf16" in summary:
    for run, row in summary.items():
        row["single_stream_over_bf16"] = round(row["single_stream_tok_s"] / summary["bf16"]["single_stream_tok_s"], 2)
        if row["c128_output_tok_s"] and summary["bf16"]["c128_output_tok_s"]:
            row["c128_over_bf16"] = round(row["c128_output_tok_s"] / summary["bf16"]["c128_output_tok_s"], 2)
json.dump(summary, open(f"{out}/quantized_summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
