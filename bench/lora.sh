#!/usr/bin/env bash
# LoRA on a GPU, one run (issue 23's figures): the Llama-3.1-8B shape (random weights) served plain, then
# with 8 random rank-16 adapters on q/k/v/o/gate/up/down (bench/make_lora_adapters.py) loaded; one
# stream and 64 concurrent streams each, the LoRA server's requests spread over its adapters; a
# summary of each against the plain server's.
#
#   OUT=/tmp/lora bash bench/lora.sh
#   ADAPTERS=8 RANK=16 NUM_PROMPTS=256 INPUT_LEN=512 OUTPUT_LEN=256 CONCURRENCY=64 bash bench/lora.sh
set -u
OUT=${OUT:-/tmp/lora}
SHAPE=${SHAPE:-llama-3.1-8b}
ADAPTERS=${ADAPTERS:-8}
RANK=${RANK:-16}
NUM_PROMPTS=${NUM_PROMPTS:-256}
INPUT_LEN=${INPUT_LEN:-512}
OUTPUT_LEN=${OUTPUT_LEN:-256}
CONCURRENCY=${CONCURRENCY:-64}
PORT=${PORT:-8092}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/env.sh
MODEL_DIR=${MODEL_DIR:-/tmp/$SHAPE-lora}
ADAPTER_DIR=${ADAPTER_DIR:-/tmp/$SHAPE-adapters}
[[ -f $MODEL_DIR/config.json ]] || $PY bench/make_model_dir.py "$MODEL_DIR" --shape "$SHAPE" > /dev/null || exit 1
[[ -f $ADAPTER_DIR/adapter$((ADAPTERS - 1))/adapter_config.json ]] \
    || $PY bench/make_lora_adapters.py "$MODEL_DIR" "$ADAPTER_DIR" --count "$ADAPTERS" --rank "$RANK" > /dev/null || exit 1
names=$(seq -s, -f "adapter%g" 0 $((ADAPTERS - 1)))
specs=$(for i in $(seq 0 $((ADAPTERS - 1))); do printf "adapter%d=%s/adapter%d," "$i" "$ADAPTER_DIR" "$i"; done)
URL=http://127.0.0.1:$PORT
serve() { $PY bench/serving.py --base-url "$URL" --tokenizer "$MODEL_DIR" "$@"; }
for server in plain lora; do
    [[ $server == lora ]] && extra="--lora-adapters ${specs%,} --max-lora-rank $RANK" || extra=""
    # shellcheck disable=SC2086
    setsid $PY -m tgi_launcher --model-id "$MODEL_DIR" --load-format dummy --port "$PORT" --hostname 127.0.0.1 \
        --max-concurrent-requests 512 $extra > "$OUT/launcher_$server.log" 2>&1 &
    launcher=$!
    for _ in $(seq 900); do curl -sf "$URL/health" > /dev/null && break; kill -0 $launcher 2> /dev/null || break; sleep 1; done
    curl -sf "$URL/health" > /dev/null || { echo "the $server server did not start"; tail -20 "$OUT/launcher_$server.log"; exit 1; }
    runs="base"
    [[ $server == lora ]] && runs="base adapters"
    for run in $runs; do
        [[ $run == adapters ]] && pick="--adapters $names" || pick=""
        # shellcheck disable=SC2086
        serve --num-prompts 4 --input-len 128 --output-len 256 --max-concurrency 1 --warmup 1 $pick \
            --result-json "$OUT/single_${server}_$run.json" > "$OUT/single_${server}_$run.log" 2>&1
        # shellcheck disable=SC2086
        serve --num-prompts "$NUM_PROMPTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --max-concurrency "$CONCURRENCY" \
            --warmup 4 $pick --result-json "$OUT/c${CONCURRENCY}_${server}_$run.json" > "$OUT/c${CONCURRENCY}_${server}_$run.log" 2>&1
        grep -hE "Successful|Failed requests|Output token throughput|Median TPOT" "$OUT/single_${server}_$run.log" "$OUT/c${CONCURRENCY}_${server}_$run.log" \
            | sed "s/^/$server $run: /"
    done
    kill -TERM -- -$launcher; wait $launcher
done
$PY bench/pair_summary.py "$OUT" "$CONCURRENCY" lora plain_base lora_base lora_adapters \
    --compare plain_base:lora_adapters:adapters_over_plain
