#!/usr/bin/env bash
# Issue 26 on a 4- or 8-GPU machine, in parts that each fit one device call (PARTS, default all):
#   tests  tests/e2e/test_many_shards.py on the GPUs: 70B- and 235B-MoE-shaped small models give
#          transformers' greedy tokens on 1, 2, 4 and 8 shards (float32), a shard of 8 killed stops the
#          launcher within 10 s naming it
#   tp4    Llama-3.1-70B shape (bf16, dummy weights) on 4 shards over HTTP: one stream, TTFT, 128
#          concurrent (1024 in / 256 out), beside each GPU's bandwidth floor; the decode step's kernels
#          and all-reduce time from bench/tp_decode.py
#   tp8    the same on 8 shards
#   moe    Qwen3-235B-A22B shape on 8 shards over HTTP
# NCCL's NVLink multicast stays off (KINDS.md). Summaries: $OUT/tp{4,8}.json, $OUT/moe.json.
#
#   OUT=/tmp/many PARTS="tests tp8" bash bench/many_gpus.sh
set -u
OUT=${OUT:-/tmp/many_gpus}
PARTS=${PARTS:-"tests tp4 tp8 moe"}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 NUM_PROMPTS=${NUM_PROMPTS:-256}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/env.sh
NUM_GPUS=$(nvidia-smi -L | wc -l)
has() { [[ " $PARTS " == *" $1 "* ]]; }
serve_shape() {  # serve_shape SHAPE NUM_SHARD NAME: families.sh's HTTP runs and summary for one shape
    if (( $2 > NUM_GPUS )); then echo "$3: needs $2 GPUs, this machine has $NUM_GPUS"; return; fi
    RESULTS=/tmp/many-results-$3 OUT=$OUT/$3 SHAPES=$1 NUM_SHARD=$2 SHARD_ARGS="--cuda-memory-fraction 0.9" \
        bash bench/families.sh > "$OUT/$3.log" 2>&1
    cp "$OUT/$3/families.json" "$OUT/$3.json" 2> /dev/null && cat "$OUT/$3.json" || tail -30 "$OUT/$3.log"
}
if has tests; then
    $PY -m pytest -q -p no:cacheprovider tests/e2e/test_many_shards.py > "$OUT/tests.log" 2>&1
    tail -1 "$OUT/tests.log"
    grep -E "^(E  |FAILED)" "$OUT/tests.log" | cut -c1-300 | head -20
fi
for shards in 4 8; do
    has "tp$shards" || continue
    serve_shape llama-3.1-70b "$shards" "tp$shards"
    if (( shards <= NUM_GPUS )); then
        $PY bench/tp_decode.py --shape llama-3.1-70b --world-sizes "$shards" > "$OUT/tp_decode_$shards.json" 2> "$OUT/tp_decode_$shards.log"
        tail -5 "$OUT/tp_decode_$shards.log"
    fi
done
has moe && serve_shape qwen3-235b-a22b 8 moe
