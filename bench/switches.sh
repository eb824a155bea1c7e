#!/usr/bin/env bash
# The kernel switches still off by default, on and off in one run (shard_step decode graphs, no HTTP):
# programmatic dependent launch (TGI_PDL, kernels/pdl.py) on the 8B shape in bf16 and on the MoE shape,
# and the fp8 tensor-core GEMV (--fp8-dot-max-rows, kernels/skinny.py) against the skinny/_scaled_mm
# path on the 8B shape quantized to fp8; then bench/pdl.py's synthetic chain and the quantized linears.
# GPU tests first, with PDL on; last, the router tokenizing long prompts in pieces on the host's cores and its CPU time per step at 128 streams
# (bench/tokenize_pieces.py, bench/router_load.py). Prints one summary line per run; JSON under $OUT.
#
#   OUT=/tmp/switches bash bench/switches.sh
set -u
OUT=${OUT:-/tmp/switches}
STEP_TIMEOUT=${STEP_TIMEOUT:-80}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-150}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/env.sh
TGI_PDL=1 timeout "$TESTS_TIMEOUT" $PY -m pytest -q -x tests/unit/test_fp8_skinny_kernel.py tests/unit/test_w4a16_kernel.py \
    tests/unit/test_kernels.py tests/unit/test_gpu_path.py > "$OUT/tests_pdl.log" 2>&1
echo "tests (TGI_PDL=1): $(tail -1 "$OUT/tests_pdl.log")"
step() {  # name, then shard_step arguments
    local name=$1; shift
    (cd bench && timeout "$STEP_TIMEOUT" $PY shard_step.py --decode-steps 32 "$@" > "$OUT/step_$name.json" 2> "$OUT/step_$name.log")
    echo "$name: $(grep -oE '"(batch_size|graph_replay_ms|prefill_step_median_ms)": [0-9.]+' "$OUT/step_$name.json" | paste -sd' ')"
}
TGI_PDL=0 step bf16 --batch-sizes 1,32 --prefill-lens 1024
TGI_PDL=1 step bf16_pdl --batch-sizes 1,32 --prefill-lens 1024
TGI_PDL=1 step fp8_pdl --batch-sizes 1,32 --prefill-lens 1024 --quantize fp8 --fp8-dot-max-rows 0
TGI_PDL=1 step fp8dot_pdl --batch-sizes 1,32 --prefill-lens 1024 --quantize fp8 --fp8-dot-max-rows 128
TGI_PDL=0 step moe --shape qwen3-30b-a3b --batch-sizes 1 --prefill-lens ''
TGI_PDL=1 step moe_pdl --shape qwen3-30b-a3b --batch-sizes 1 --prefill-lens ''
timeout 90 $PY bench/quantized_linear.py --rows 1,16,128 > "$OUT/qlinear.json" 2> "$OUT/qlinear.log"
grep -oE '"(shape|m|bf16_ms|fp8_ms|fp8_dot_ms|int4_ms)": [^,]+' "$OUT/qlinear.log" | paste -sd' ' | sed 's/ "shape"/\n"shape"/g'
timeout 40 $PY bench/pdl.py --layers 64 > "$OUT/pdl.json" 2>&1
echo "pdl.py: $(grep -oE '"(graph_replay_ms|speedup|same_output)": [a-z0-9.]+' "$OUT/pdl.json" | paste -sd' ')"
(cd bench && timeout 60 $PY tokenize_pieces.py > "$OUT/tokenize_pieces.json" 2>&1)
echo "tokenize_pieces.py: $(grep -oE '"(num_tokens|whole_ms|pieces|pieces_ms|same_ids)": [a-z0-9.]+' "$OUT/tokenize_pieces.json" | head -18 | paste -sd' ')"
(cd bench && timeout 90 $PY router_load.py --seconds 15 > "$OUT/router_load.json" 2>&1)
echo "router_load.py: $(grep -oE '"(router_cpu_ms_per_step|router_cpu_us_per_token|steps_per_s)": [0-9.]+' "$OUT/router_load.json" | paste -sd' ')"
