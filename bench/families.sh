#!/usr/bin/env bash
# Several model shapes served over HTTP in one device call (bench/gpu_suite.sh's http part for each,
# random bf16 weights), with each shape's weight bytes read per decode token and its bandwidth floor,
# packed into one archive and one summary (the device tool brings back few files).
#
#   SHAPES="gemma-7b qwen3-8b qwen3-30b-a3b" NUM_PROMPTS=256 bash bench/families.sh
#   HF_SHAPES=qwen3-30b-a3b HF_PROMPTS=64 ...   # also transformers' generate_batch on those shapes
set -u
OUT=${OUT:-/tmp/families}
SHAPES=${SHAPES:-"gemma-7b qwen3-8b qwen3-30b-a3b"}
HF_SHAPES=${HF_SHAPES:-}
HBM_GBPS=${HBM_GBPS:-}  # the floor's bandwidth; default: measured here by a device-to-device copy
export NUM_PROMPTS=${NUM_PROMPTS:-256} PY=${PY:-python3}
RESULTS=${RESULTS:-/tmp/families-results}
NUM_SHARD=${NUM_SHARD:-1}  # tensor-parallel shards (bench/gpu_suite.sh reads it too)
mkdir -p "$OUT" "$RESULTS"
cd "$(dirname "$0")/.."
for shape in $SHAPES; do
    echo "== $shape"
    HF=0
    [[ " $HF_SHAPES " == *" $shape "* ]] && HF=1
    OUT=$RESULTS/$shape NUM_SHARD=$NUM_SHARD LOGS=$RESULTS/$shape/logs SHAPE=$shape PARTS=http HF=$HF HF_PROMPTS=${HF_PROMPTS:-64} C128=${C128:-1} \
        bash bench/gpu_suite.sh 2>&1 | tail -14
done
PYTHONPATH=server:proto:bench $PY bench/families_summary.py "$RESULTS" --num-shard "$NUM_SHARD" ${HBM_GBPS:+--hbm-gbps "$HBM_GBPS"} \
    > "$OUT/families.json"
cat "$OUT/families.json"
tar -czf "$OUT/families.tar.gz" -C "$RESULTS" .
