#!/usr/bin/env bash
# One GPU measurement in one call: GPU tests, the shard's step times, then the real server over HTTP
# (Llama-3.1-8B shape, random bf16 weights): one stream, time to first token, 128 concurrent streams.
# Optionally HF transformers' generate_batch on the same throughput workload (HF=1).
#
#   OUT=/tmp/results bash bench/gpu_suite.sh            # the device tool sets OUT
#   PARTS="tests step http" NUM_PROMPTS=512 HF=1 bash bench/gpu_suite.sh
#   C128_SWEEP="1024 2048 8192" bash bench/gpu_suite.sh   # also 128 concurrent at these prefill budgets
#   PARTS=mixed bash bench/gpu_suite.sh                     # prompt chunks riding along 128 decodes
#   PARTS=http KV_CACHE_DTYPE=fp8_e4m3fn TAG=_fp8 bash bench/gpu_suite.sh   # the server with an fp8 KV cache
#   PARTS=http NUM_SHARD=2 TAG=_tp2 bash bench/gpu_suite.sh   # two tensor-parallel shards (SHARD_ARGS: more shard flags)
#   PARTS=http QUANTIZATION=awq MODEL_DIR=/tmp/awq TAG=_awq bash bench/gpu_suite.sh   # a 4-bit AWQ checkpoint's shape
#   PARTS=http SHARD_ARGS="--quantize fp8" TAG=_fp8w bash bench/gpu_suite.sh   # bf16 weights quantized to fp8 at load
#   PARTS=allreduce bash bench/gpu_suite.sh                   # NCCL against the peer-to-peer all-reduce (2+ GPUs)
#
# Writes JSON files and logs under $OUT; prints a summary line per measurement. The tokenizer comes
# from bench/assets (git-ignored: carry it to the GPU machine).
set -u
OUT=${OUT:-/tmp/gpu-suite}
PARTS=${PARTS:-"tests step http"}
NUM_PROMPTS=${NUM_PROMPTS:-512}
HF=${HF:-0}
HF_PROMPTS=${HF_PROMPTS:-$NUM_PROMPTS}
PORT=${PORT:-3000}
PREFILL_TOKENS=${PREFILL_TOKENS:-4096}  # the router's --max-batch-prefill-tokens
TAG=${TAG:-}  # suffix of the result files
C128_SWEEP=${C128_SWEEP:-}  # more --max-batch-prefill-tokens values to run the 128-concurrent workload at
KV_CACHE_DTYPE=${KV_CACHE_DTYPE:-auto}  # the shard's --kv-cache-dtype
NUM_SHARD=${NUM_SHARD:-1}  # tensor-parallel shards for the http part, one GPU each
SHARD_ARGS=${SHARD_ARGS:-}  # more `tgi_server serve` flags for the http part, e.g. --disable-custom-all-reduce
ROUTER_ARGS=${ROUTER_ARGS:-}  # more `tgi_router` flags for the http part, e.g. --speculate 4
C128=${C128:-1}  # 0: the http part skips the 128-concurrent workload
SHAPE=${SHAPE:-llama-3.1-8b}
QUANTIZATION=${QUANTIZATION:-}  # the http part's model declares a checkpoint quantized so (bench/make_model_dir.py: fp8, awq, gptq)
GPU_TESTS=${GPU_TESTS:-"tests/unit/test_gpu_path.py tests/unit/test_kernels.py tests/e2e/test_shard_faults.py"}
MODEL_DIR=${MODEL_DIR:-/tmp/$SHAPE-dummy}
PY=${PY:-python3}
LOGS=${LOGS:-/tmp/gpu-suite-logs}  # $OUT brings back at most 8 files: the JSON, and logs.tar.gz
mkdir -p "$OUT" "$LOGS"
trap 'tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .' EXIT
cd "$(dirname "$0")/.."
# Router dependencies the GPU image lacks (aiohttp-cors, aiohttp-sse, swagger-ui-bundle, llguidance), carried as wheels.
source bench/env.sh

has() { [[ " $PARTS " == *" $1 "* ]]; }

if has tests; then  # with two GPUs or more, also two shards against one, and shards killed or hung under load
    # shellcheck disable=SC2086
    $PY -m pytest -q -p no:cacheprovider $GPU_TESTS > "$LOGS/tests.log" 2>&1
    tail -1 "$LOGS/tests.log"
    grep -E "^(E  |FAILED)" "$LOGS/tests.log" | cut -c1-300 | head -20
fi

if has allreduce; then
    $PY bench/all_reduce.py --world-size 2 > "$OUT/all_reduce.json" 2> "$LOGS/all_reduce.log"
    grep -E "us " "$LOGS/all_reduce.log"
fi

if has skinny; then  # the few-token linear kernel against cuBLAS, then whole decode steps without it
    $PY bench/skinny_linear.py --rows "${SKINNY_ROWS:-1}" > "$OUT/skinny_linear.json" 2> "$LOGS/skinny_linear.log"
    grep -v "^ *$" "$LOGS/skinny_linear.log" | tail -20
    $PY bench/shard_step.py --shape llama-3.1-8b --batch-sizes 1,2,4 --decode-steps 48 --prompt-len 128 \
        --prefill-lens "" --skinny-max-rows 0 > "$OUT/shard_step_cublas.json" 2> "$LOGS/shard_step_cublas.log"
    $PY -c "import json; d = json.load(open('$OUT/shard_step_cublas.json')); [print('cuBLAS only', r) for r in d['results']]"
fi

if has attention; then  # the attention kernel's prefill and decode settings
    $PY bench/attention_prefill.py > "$OUT/attention_prefill.json" 2> "$LOGS/attention_prefill.log"
    grep -E "TFLOP" "$LOGS/attention_prefill.log"
    $PY bench/attention_decode.py ${DECODE_SWEEP:-} > "$OUT/attention_decode.json" 2> "$LOGS/attention_decode.log"
    $PY - "$OUT/attention_decode.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
for name, kv_dtype in dict.fromkeys((r["workload"], r["kv_dtype"]) for r in rows):
    ranked = sorted((r for r in rows if (r["workload"], r["kv_dtype"]) == (name, kv_dtype)), key=lambda r: r["ms"])
    print(name, kv_dtype, "best:", *(f'{r["decode_block_n"]}/{r["decode_warps"]}/{r["decode_stages"]} {r["ms"]} ms {r["kv_tb_s"]} TB/s;' for r in ranked[:3]))
PY
fi

if has timeline; then  # one stream's decode steps under the profiler: GPU busy time and the gaps
    $PY bench/decode_timeline.py --steps 48 --profiled-steps 12 --trace "$OUT/decode_timeline.json.gz" \
        > "$OUT/decode_timeline.json" 2> "$LOGS/decode_timeline.log"
    grep -E "^step|^   gap" "$LOGS/decode_timeline.log" | cut -c1-400
fi

if has profile; then  # the GPU kernels of decode steps (batch 1 and 128, 1024-token contexts) and prefills
    $PY bench/shard_step.py --shape llama-3.1-8b --batch-sizes 1 --decode-steps 16 --prompt-len 1024 \
        --prefill-lens 1024,4096 --profile --profile-batch-sizes 1,128 > /dev/null 2> "$OUT/profile.log"
    grep -E "^== |Self CUDA time total" "$OUT/profile.log"
fi

if has mixed; then  # a prompt chunk riding along 128 decodes at 1024-token contexts, against each alone
    $PY bench/mixed_step.py --decode-rows 128 --context 1024 --chunks "${MIXED_CHUNKS:-128,512,896,2048,3968}" \
        --profile-chunk "${MIXED_PROFILE_CHUNK:-896}" > "$OUT/mixed_step.json" 2> "$LOGS/mixed_step.log"
    grep -E "^\{|^== |Self CUDA time total|Self CPU time total" "$LOGS/mixed_step.log"
fi

if has step; then
    $PY bench/shard_step.py --shape llama-3.1-8b --batch-sizes 1,2,4,8,32,128 --decode-steps 48 --prompt-len 128 \
        --prefill-lens 128,1024 > "$OUT/shard_step.json" 2> "$LOGS/shard_step.log"
    $PY -c "import json; d = json.load(open('$OUT/shard_step.json')); print('prefill', d['prefill']); [print(r) for r in d['results']]"
fi

if has http; then
    $PY bench/make_model_dir.py "$MODEL_DIR" --shape "$SHAPE" ${QUANTIZATION:+--quantization "$QUANTIZATION"} > /dev/null || exit 1
    SOCKET=/tmp/tgi-bench-$$
    SHARDS=()
    for ((rank = 0; rank < NUM_SHARD; rank++)); do
        # shellcheck disable=SC2086
        $PY -m tgi_server serve "$MODEL_DIR" --shard-uds-path "$SOCKET" --load-format dummy --kv-cache-dtype "$KV_CACHE_DTYPE" \
            --rank $rank --num-shard "$NUM_SHARD" --master-port $((29500 + $$ % 1000)) $SHARD_ARGS \
            > "$LOGS/shard$TAG-$rank.log" 2>&1 &
        SHARDS+=($!)
    done
    SHARD="${SHARDS[*]}"
    for ((rank = 0; rank < NUM_SHARD; rank++)); do
        until [ -S "$SOCKET-$rank" ]; do
            kill -0 "${SHARDS[$rank]}" 2> /dev/null || { echo "shard $rank died:"; tail -20 "$LOGS/shard$TAG-$rank.log"; exit 1; }
            sleep 0.5
        done
    done
    start_router() {  # start_router PREFILL_TOKENS LOG_TAG
        $PY -m tgi_router --tokenizer-path "$MODEL_DIR" --model-id "$SHAPE-dummy" --shard-uds-path "$SOCKET" --num-shard "$NUM_SHARD" \
            --port "$PORT" --max-input-tokens 2048 --max-total-tokens 4096 --max-batch-prefill-tokens "$1" \
            --max-batch-size 256 --max-concurrent-requests 1024 ${ROUTER_ARGS:-} > "$LOGS/router$2.log" 2>&1 &
        ROUTER=$!
        until curl -sf "localhost:$PORT/health" > /dev/null; do
            # shellcheck disable=SC2086
            kill -0 "$ROUTER" 2> /dev/null || { echo "the router died:"; tail -20 "$LOGS/router$2.log"; kill $SHARD; exit 1; }
            sleep 0.5
        done
    }
    start_router "$PREFILL_TOKENS" "$TAG"
    serve() { $PY bench/serving.py --base-url "http://127.0.0.1:$PORT" --tokenizer "$MODEL_DIR" "$@"; }
    serve --num-prompts 4 --input-len 128 --output-len 256 --max-concurrency 1 --warmup 1 \
        --result-json "$OUT/http_single_stream$TAG.json" > "$LOGS/http_single_stream$TAG.txt" 2>&1
    serve --num-prompts 10 --input-len 1024 --output-len 1 --max-concurrency 1 --warmup 2 \
        --result-json "$OUT/http_ttft_1024$TAG.json" > "$LOGS/http_ttft_1024$TAG.txt" 2>&1
    # Where a lone 1024-token request's time goes, by the router's timing headers (ms) and curl's total (s).
    PROMPT=$($PY -c "print('hello ' * 1023)")
    for i in 1 2 3; do
        curl -s -D - -o /dev/null -w "curl total %{time_total}\n" -H 'Content-Type: application/json' \
            -d "{\"inputs\": \"$PROMPT\", \"parameters\": {\"max_new_tokens\": 1}}" "localhost:$PORT/generate" \
            | grep -iE "x-(total|validation|queue|inference)-time|x-prompt-tokens|curl total" | tr -d '\r' | tr '\n' ' '
        echo
    done
    curl -s "localhost:$PORT/metrics" > "$LOGS/metrics_before_c128$TAG.txt"
    runs="http_single_stream$TAG http_ttft_1024$TAG"
    if [ "$C128" = 1 ]; then
        serve --num-prompts "$NUM_PROMPTS" --input-len 1024 --output-len 256 --max-concurrency 128 --warmup 4 \
            --result-json "$OUT/http_c128$TAG.json" > "$LOGS/http_c128$TAG.txt" 2>&1
        runs="$runs http_c128$TAG"
    fi
    for f in $runs; do
        echo "== $f"; grep -E "Successful|Failed requests|Output token throughput|TTFT|TPOT" "$LOGS/$f.txt"
    done
    curl -s "localhost:$PORT/metrics" > "$LOGS/metrics$TAG.txt"
    for budget in $C128_SWEEP; do
        kill "$ROUTER"; wait "$ROUTER"
        start_router "$budget" "${TAG}_p$budget"
        serve --num-prompts "$NUM_PROMPTS" --input-len 1024 --output-len 256 --max-concurrency 128 --warmup 4 \
            --result-json "$LOGS/http_c128${TAG}_p$budget.json" > "$LOGS/http_c128${TAG}_p$budget.txt" 2>&1
        curl -s "localhost:$PORT/metrics" > "$LOGS/metrics${TAG}_p$budget.txt"
        echo "== c128 at --max-batch-prefill-tokens $budget"
        grep -E "Output token throughput|TTFT|TPOT" "$LOGS/http_c128${TAG}_p$budget.txt"
    done
    # shellcheck disable=SC2086
    kill "$ROUTER" $SHARD; wait
    grep -iE "error|Traceback" "$LOGS"/shard"$TAG"-*.log | head -5
fi

if [ "$HF" = 1 ]; then
    $PY bench/hf_generate_batch.py --model "$MODEL_DIR" --load-format dummy --num-prompts "$HF_PROMPTS" \
        --input-len 1024 --output-len 256 --result-json "$OUT/hf_generate_batch.json" > "$LOGS/hf.txt" 2>&1
    tail -15 "$LOGS/hf.txt"
fi
