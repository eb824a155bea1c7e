#!/usr/bin/env bash
# Multi-node tensor parallel on one two-GPU host (issue 25's figure): the same model served with
# --num-shard 2 by one launcher, then by two launchers standing in for two nodes (--nnodes 2, one GPU
# each through CUDA_VISIBLE_DEVICES, node 1's shard serving node 0's router over TCP with the shard
# secret, torch.distributed's rendezvous on 127.0.0.1); one stream and CONCURRENCY streams against each.
# Across "nodes" every all-reduce is NCCL's (the peer-to-peer one is for one host): that is the cost shown.
#
#   OUT=/tmp/multi-node bash bench/multi_node.sh
#   SHAPE=llama-3.1-8b NUM_PROMPTS=128 INPUT_LEN=512 OUTPUT_LEN=256 CONCURRENCY=32 bash bench/multi_node.sh
set -u
OUT=${OUT:-/tmp/multi-node}
SHAPE=${SHAPE:-llama-3.1-8b}
NUM_PROMPTS=${NUM_PROMPTS:-128}
INPUT_LEN=${INPUT_LEN:-512}
OUTPUT_LEN=${OUTPUT_LEN:-256}
CONCURRENCY=${CONCURRENCY:-32}
PORT=${PORT:-8093}
MASTER_PORT=${MASTER_PORT:-29700}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/env.sh
MODEL_DIR=${MODEL_DIR:-/tmp/$SHAPE-multi-node}
[[ -f $MODEL_DIR/config.json ]] || $PY bench/make_model_dir.py "$MODEL_DIR" --shape "$SHAPE" > /dev/null || exit 1
URL=http://127.0.0.1:$PORT
export SHARD_SECRET=${SHARD_SECRET:-bench-$RANDOM$RANDOM}
common=(--model-id "$MODEL_DIR" --load-format dummy --port "$PORT" --hostname 127.0.0.1 --max-concurrent-requests 512
        --num-shard 2 --master-addr 127.0.0.1 --master-port "$MASTER_PORT")
wait_healthy() {  # the launcher pids that must stay up
    for _ in $(seq 900); do
        curl -sf "$URL/health" > /dev/null && return 0
        for pid in "$@"; do kill -0 "$pid" 2> /dev/null || return 1; done
        sleep 1
    done
    return 1
}
for layout in one-node two-nodes; do
    pids=()
    if [[ $layout == one-node ]]; then
        setsid $PY -m tgi_launcher "${common[@]}" > "$OUT/launcher_$layout.log" 2>&1 &
        pids+=($!)
    else
        for rank in 0 1; do
            CUDA_VISIBLE_DEVICES=$rank setsid $PY -m tgi_launcher "${common[@]}" --nnodes 2 --node-rank $rank \
                > "$OUT/launcher_${layout}_node$rank.log" 2>&1 &
            pids+=($!)
        done
    fi
    wait_healthy "${pids[@]}" || { echo "the $layout server did not start"; tail -20 "$OUT"/launcher_"$layout"*.log; exit 1; }
    serve() { $PY bench/serving.py --base-url "$URL" --tokenizer "$MODEL_DIR" "$@"; }
    serve --num-prompts 4 --input-len 128 --output-len 256 --max-concurrency 1 --warmup 1 \
        --result-json "$OUT/single_$layout.json" > "$OUT/single_$layout.log" 2>&1
    serve --num-prompts "$NUM_PROMPTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --max-concurrency "$CONCURRENCY" \
        --warmup 4 --result-json "$OUT/c${CONCURRENCY}_$layout.json" > "$OUT/c${CONCURRENCY}_$layout.log" 2>&1
    grep -hE "Successful|Failed requests|Output token throughput|Median TPOT" "$OUT/single_$layout.log" \
        "$OUT/c${CONCURRENCY}_$layout.log" | sed "s/^/$layout: /"
    for pid in "${pids[@]}"; do kill -TERM -- -"$pid" 2> /dev/null; done
    for pid in "${pids[@]}"; do wait "$pid"; done
done
$PY bench/pair_summary.py "$OUT" "$CONCURRENCY" multi_node one-node two-nodes \
    --compare one-node:two-nodes:two_nodes_over_one
